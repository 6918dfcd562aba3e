#!/usr/bin/env bash
# The fault matrix of docs/reliability.md: a small 4-rank moe-train run (tp 2 + sequence
# parallel, ep 2, all-to-all dispatcher, distributed optimizer, bf16, the prepared corpus under
# data/) meets one fault per row: world rank 1 killed with SIGKILL at each phase
# (MOE_FAULT_INJECT=phase:rank:iteration), a file-size limit during a save, and a NaN in one
# gradient. Each row starts from the same checkpoint at iteration 2 and runs to iteration 4; the
# script checks that the job ends (no rank left running) with a non-zero status and the expected
# message, that the latest checkpoint is still a complete one, and that it resumes. It prints
# the table (markdown) and exits non-zero when any row fails.
#   scripts/faults.sh [build dir]      (default build; env MPIEXEC, MOE_FAULTS_WORK)
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
train="$build/tools/moe-train"
mpiexec=${MPIEXEC:-mpirun}
[[ -x $train ]] || { echo "faults: $train is not built" >&2; exit 2; }
[[ -f data/fortunes_text_document.idx && -f data/tokenizer.model ]] ||
  { echo "faults: the prepared corpus data/fortunes_text_document is missing" >&2; exit 2; }
work=$(mktemp -d "${MOE_FAULTS_WORK:-/tmp}/moe_faults.XXXXXX")
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1
# Peers of a dead rank that wait in a collective give up after this long (moecore's watchdog).
export MOE_COLLECTIVE_TIMEOUT_S=${MOE_COLLECTIVE_TIMEOUT_S:-30}
limit_s=$((MOE_COLLECTIVE_TIMEOUT_S + 60))  # a run taking longer counts as a hang

job=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32
  --max-position-embeddings 32 --swiglu --normalization RMSNorm --position-embedding-type rope
  --untie-embeddings-and-output-weights --disable-bias-linear --num-experts 4 --moe-router-topk 2
  --moe-aux-loss-coeff 1e-2 --moe-grouped-gemm --moe-token-dispatcher-type alltoall
  --tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 2
  --use-distributed-optimizer --bf16 --micro-batch-size 2 --global-batch-size 8 --lr 1e-3
  --data-path data/fortunes_text_document --tokenizer-type Llama2Tokenizer
  --tokenizer-model data/tokenizer.model --split 98,2,0 --eval-iters 0 --log-interval 1
  --train-iters 4 --save-interval 2)

# run LOG [ENV=VALUE...] -- [extra moe-train flags]: mpirun -np 4; sets status and seconds.
run() {
  local log=$1
  shift
  local environment=()
  while [[ $1 != -- ]]; do
    [[ -n $1 ]] && environment+=("$1")
    shift
  done
  shift
  local start=$SECONDS
  env "${environment[@]}" timeout -k 5 "$limit_s" "$mpiexec" --oversubscribe --allow-run-as-root \
    --bind-to none -np 4 "$train" "${job[@]}" "$@" >"$log" 2>&1
  status=$?
  seconds=$((SECONDS - start))
}

baseline="$work/baseline"
run "$work/baseline.log" -- --save "$baseline" --exit-interval 2
if [[ $status -ne 0 || $(cat "$baseline/latest_checkpointed_iteration.txt") != 2 ]]; then
  echo "faults: the baseline run failed (status $status):" >&2
  tail -20 "$work/baseline.log" >&2
  exit 1
fi

failures=0
rows=()
# row NAME FAULT-ENV EXPECTED-MESSAGE [DIR]: the run saves into DIR (default $work/NAME).
row() {
  local name=$1 fault=$2 expected=$3 dir=${4:-$work/$1}
  local log="$work/$name.log"
  cp -r "$baseline" "$dir"
  run "$log" "$fault" -- --save "$dir" --load "$dir"
  local fault_status=$status fault_seconds=$seconds
  local leftover
  leftover=$(pgrep -f -- "--save $dir" | wc -l)
  local latest
  latest=$(cat "$dir/latest_checkpointed_iteration.txt" 2>/dev/null || echo none)
  local partial=""
  [[ -e "$dir/iter_0000004" ]] && partial=" + iter_0000004"
  local leftover_note=""
  [[ -e "$dir/iter_0000004.tmp" ]] && leftover_note=" (iter_0000004.tmp left; the next save removes it)"
  # The surviving checkpoint resumes to the end (saving elsewhere: the disk may still be full).
  run "$log.resume" -- --save "$work/$name.resumed" --load "$dir"
  local resumed=no
  grep -q "loaded checkpoint from '$dir' at iteration 2" "$log.resume" && [[ $status -eq 0 ]] && resumed=yes
  local message
  message=$(grep -o -m1 -- "$expected" "$log" || true)
  local verdict=pass
  if [[ $fault_status -eq 0 || $fault_status -eq 124 || $latest != 2 || -n $partial || $leftover -ne 0 || -z $message || $resumed != yes ]]; then
    verdict=FAIL
    failures=$((failures + 1))
    echo "faults: row '$name' failed; its log:" >&2
    tail -25 "$log" >&2
  fi
  local first_line
  first_line=$(grep -m1 -E "moe-train: error|exited on signal" "$log" | cut -c1-160 |
    sed 's/|/\\|/g')
  rows+=("| $name | $fault_status | ${fault_seconds}s | latest $latest$partial$leftover_note, resumes: $resumed | \`${first_line}\` | $verdict |")
}

# OpenMPI's own report of a rank that died: it then ends the whole job at once.
killed="process rank 1 with PID [0-9]* on node [^ ]* exited on signal 9 (Killed)"
for phase in startup forward alltoall backward optimizer; do
  # startup is "iteration 0"; the others hit iteration 3, one step after the checkpoint.
  iteration=3
  [[ $phase == startup ]] && iteration=0
  row "kill-$phase" "MOE_FAULT_INJECT=$phase:1:$iteration" "$killed"
done
row "kill-mid-save" "MOE_FAULT_INJECT=save:1:4" "$killed"
row "nan-gradient" "MOE_FAULT_INJECT=nan:1:3" \
  "iteration 3: the gradient of '[^']*' holds nan (element 0) on rank 1"
# A disk that holds the baseline checkpoint (10 MB) and not a second one: a 16 MB tmpfs (needs
# root; a file-size limit, ulimit -f, would instead break OpenMPI's start-up in PMIx).
if mkdir "$work/tmpfs" && mount -t tmpfs -o size=16m tmpfs "$work/tmpfs" 2>/dev/null; then
  trap 'umount "$work/tmpfs"; rm -rf "$work"' EXIT
  row "disk-full" "" "saving checkpoint .* failed on rank(s) .*No space left on device" \
    "$work/tmpfs/ckpt"
else
  rows+=("| disk-full | - | - | - | not run: mounting a tmpfs needs root | skipped |")
fi

echo "| fault | exit code | time to exit | checkpoint after the fault | first message | verdict |"
echo "| --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
echo
echo "faults: ${#rows[@]} rows, $failures failed (collective timeout ${MOE_COLLECTIVE_TIMEOUT_S}s)"
((failures == 0))
