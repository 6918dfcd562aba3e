#!/usr/bin/env bash
# Runs the benchmarks and their PyTorch peers and writes the reports under docs/benchmarks/.
#
#   bench/run.sh                 every step, with the build in ./build
#   BUILD_DIR=build-x bench/run.sh gemm
#   BENCH_THREADS=2              threads for ours and for PyTorch (default: all cores)
#
# Each step is a function step_<name>; to add a benchmark, write step_<name> below and add
# <name> to ALL_STEPS. Raw results go to bench/out/ (not tracked); reports to docs/benchmarks/.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-$root/build}"
[[ "$build" = /* ]] || build="$root/$build"
out="$root/bench/out"
docs="$root/docs/benchmarks"
threads="${BENCH_THREADS:-$(nproc)}"
peer_python=/usr/bin/python3  # Debian's python3-torch, not whatever python3 is on PATH
mkdir -p "$out" "$docs"
export OMP_NUM_THREADS="$threads"

# One line describing the machine and its load now, for the reports.
machine() {
  echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
    "load average $(cut -d' ' -f1-3 /proc/loadavg) at start"
}

require() {
  [[ -x "$1" ]] || { echo "bench/run.sh: $1 is missing; build it first (cmake --build $build)" >&2; exit 1; }
}

# Dense SGEMM and grouped GEMM (ours, per-expert OpenBLAS, PyTorch per-expert matmuls).
step_gemm() {
  require "$build/bench/bench_gemm"
  local started
  started="$(machine)"
  echo "== gemm: bench_gemm ($threads threads)"
  "$build/bench/bench_gemm" --benchmark_format=console --benchmark_out_format=json \
    --benchmark_out="$out/gemm.json"
  echo "== gemm: PyTorch peer"
  "$peer_python" "$root/bench/torch_grouped_gemm.py" --out "$out/gemm_torch.json" \
    --threads "$threads"
  "$peer_python" "$root/bench/plot_gemm.py" --ours "$out/gemm.json" --peer "$out/gemm_torch.json" \
    --markdown "$docs/gemm.md" --png "$docs/grouped_gemm.png" \
    --command "BENCH_THREADS=$threads bench/run.sh gemm" --machine "$started"
  echo "== gemm: wrote docs/benchmarks/gemm.md and docs/benchmarks/grouped_gemm.png"
}

ALL_STEPS=(gemm)

steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=("${ALL_STEPS[@]}")
for step in "${steps[@]}"; do
  if ! declare -F "step_$step" > /dev/null; then
    echo "bench/run.sh: unknown step '$step' (steps: ${ALL_STEPS[*]})" >&2
    exit 2
  fi
  "step_$step"
done
