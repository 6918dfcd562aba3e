#!/usr/bin/env bash
# The main job: trains a small Mixtral-like MoE model (4 layers, hidden 256, 8 experts, top-2
# routing with aux and z losses, SwiGLU experts in a grouped GEMM, RMSNorm, rope, GQA) in bf16
# with the distributed optimizer on the default corpus (the Debian fortunes, tokenized with the
# SentencePiece model that scripts/prepare_data.sh trains), on 2 MPI ranks with expert
# parallelism 2, for a few minutes. The loss falls from ~8.3 (ln 4096) to about 6; a
# checkpoint, a TensorBoard event file and a CSV of the scalars are written under
# ${MOE_DEMO_DIR:-build/demo}/.
#
# The flags are the seed Mixtral script's, scaled down; only the launcher differs
# (mpirun ... moe-train instead of torchrun ... pretrain_gpt.py).
#
# Environment: MOE_BUILD_DIR (default build), MOE_DEMO_DIR (default $MOE_BUILD_DIR/demo),
# MOE_DEMO_ITERS (default 120).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

build_dir=${MOE_BUILD_DIR:-build}
run_dir=${MOE_DEMO_DIR:-$build_dir/demo}
iterations=${MOE_DEMO_ITERS:-120}
dataset=data/fortunes_text_document
tokenizer=data/tokenizer.model
for file in "$build_dir/tools/moe-train" "$dataset.bin" "$dataset.idx" "$tokenizer"; do
  [[ -e $file ]] || { echo "demo: $file is missing (scripts/setup.sh should have made it)" >&2; exit 1; }
done
if [[ -e $run_dir ]]; then
  echo "demo: removing the previous demo output $run_dir/"
  rm -rf "$run_dir"
fi

MODEL_ARGS=(
  --use-mcore-models --disable-bias-linear --seq-length 128 --max-position-embeddings 128
  --num-layers 4 --hidden-size 256 --ffn-hidden-size 512 --num-attention-heads 8
  --init-method-std 0.02 --attention-dropout 0.0 --hidden-dropout 0.0 --normalization RMSNorm
  --position-embedding-type rope --swiglu --untie-embeddings-and-output-weights
  --group-query-attention --num-query-groups 4 --no-masked-softmax-fusion --no-position-embedding
)
MOE_ARGS=(
  --num-experts 8 --moe-router-load-balancing-type aux_loss --moe-router-topk 2
  --moe-aux-loss-coeff 1e-2 --moe-z-loss-coeff 1e-3 --moe-grouped-gemm
)
DATA_ARGS=(
  --tokenizer-type Llama2Tokenizer --tokenizer-model "$tokenizer" --data-path "$dataset"
  --split 98,2,0
)
TRAINING_ARGS=(
  --micro-batch-size 8 --global-batch-size 16 --lr 2e-3 --train-iters "$iterations"
  --lr-decay-style cosine --min-lr 2e-4 --weight-decay 0.1 --lr-warmup-iters 5 --clip-grad 1.0
  --bf16
)
MODEL_PARALLEL_ARGS=(
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --expert-model-parallel-size 2
  --use-distributed-optimizer
)
LOGGING_ARGS=(
  --log-interval 10 --save-interval 60 --eval-interval 40 --eval-iters 4
  --save "$run_dir/checkpoints" --load "$run_dir/checkpoints"
  --tensorboard-dir "$run_dir/tensorboard" --log-file "$run_dir/train.csv"
)

echo "demo: training on 2 ranks with expert parallelism 2 ($iterations iterations)"
OMP_NUM_THREADS=1 mpirun --allow-run-as-root --oversubscribe --bind-to none -np 2 \
  "$build_dir/tools/moe-train" "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${DATA_ARGS[@]}" \
  "${TRAINING_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${LOGGING_ARGS[@]}"

echo
latest=$(cat "$run_dir/checkpoints/latest_checkpointed_iteration.txt")
echo "demo: checkpoint:  $run_dir/checkpoints/$(printf 'iter_%07d' "$latest") (iteration $latest)"
echo "demo: TensorBoard: tensorboard --logdir $run_dir/tensorboard"
echo "demo: scalars:     $run_dir/train.csv"
echo "demo: lm loss by logged iteration:"
awk -F, '$2 == "lm loss" && ($1 == 1 || $1 % 10 == 0) { printf "  iteration %4d  lm loss %.3f\n", $1, $3 }' \
  "$run_dir/train.csv"
