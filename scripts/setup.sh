#!/usr/bin/env bash
# Installs the Debian 12 packages moecore needs (only when one is missing), prepares the default
# corpus, and configures and builds the project into build/. Safe to run again: a second run does
# no apt work and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  cmake ninja-build g++ pkg-config ccache clang-format
  libopenmpi-dev openmpi-bin
  libopenblas-openmp-dev libomp-dev
  libsentencepiece-dev sentencepiece
  nlohmann-json3-dev libcli11-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  python3-torch python3-numpy python3-matplotlib
  fortunes fortunes-min
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=()
  if [[ $(id -u) -ne 0 ]]; then sudo_cmd=(sudo); fi
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}"
else
  echo "setup: all ${#packages[@]} packages present, no apt work"
fi

build_dir=${MOE_BUILD_DIR:-build}
if [[ ! -f $build_dir/build.ninja ]]; then
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release ${MOE_CMAKE_ARGS:-}
fi
cmake --build "$build_dir" --parallel "$(nproc)"

if [[ -x scripts/prepare_data.sh ]]; then
  scripts/prepare_data.sh
fi
