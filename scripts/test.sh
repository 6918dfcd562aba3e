#!/usr/bin/env bash
# Sets everything up, checks the C++ formatting, then runs the whole default CTest suite (labels
# unit and mpi; tests labelled 'long' run only with MOE_TEST_LONG=1). Exits non-zero on any
# failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/check_format.sh
build_dir=${MOE_BUILD_DIR:-build}
exclude=(-LE long)
if [[ ${MOE_TEST_LONG:-0} == 1 ]]; then exclude=(); fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
trap 'echo "reference checks (torch, numpy): $([[ ${MOE_ALLOW_MISSING_REFERENCES:-0} == 1 ]] && echo "MOE_ALLOW_MISSING_REFERENCES=1 set: checks whose package is missing skip instead of failing" || echo "required: a missing package fails its checks (MOE_ALLOW_MISSING_REFERENCES not set)")"' EXIT
ctest --test-dir "$build_dir" --output-on-failure --timeout 600 "${exclude[@]}" "$@"
