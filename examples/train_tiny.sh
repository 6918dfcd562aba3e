#!/usr/bin/env bash
# Trains a tiny member of one MoE model family on the default corpus (scripts/setup.sh prepares
# it) on 2 MPI ranks with expert parallelism 2, in bf16 with the distributed optimizer:
#
#   examples/train_tiny.sh mixtral       # GQA, softmax top-2 routing with aux and z losses
#   examples/train_tiny.sh qwen3-moe     # + q/k layernorm, 16 fine-grained experts, top-4
#   examples/train_tiny.sh deepseek-v3   # multi-latent attention, sigmoid routing with the
#                                        # aux-loss-free expert bias, group-limited top-4, one
#                                        # shared expert, first layer dense, multi-token prediction
#
# Each family's flags are those of its Megatron-LM launch script, scaled down (docs/model_families.md
# lists them and the losses measured). Environment: MOE_BUILD_DIR (default build), MOE_EXAMPLE_DIR
# (default $MOE_BUILD_DIR/examples/<family>; its checkpoints/ and train.csv from an earlier run are
# replaced), MOE_EXAMPLE_ITERS (default 100). Extra arguments are passed to moe-train.
set -euo pipefail
cd "$(dirname "$0")/.."

family=${1:-}
shift || true
build_dir=${MOE_BUILD_DIR:-build}
run_dir=${MOE_EXAMPLE_DIR:-$build_dir/examples/$family}
iterations=${MOE_EXAMPLE_ITERS:-100}
dataset=data/fortunes_text_document
tokenizer=data/tokenizer.model

COMMON_MODEL=(
  --num-layers 4 --hidden-size 256 --num-attention-heads 8 --seq-length 128
  --max-position-embeddings 128 --normalization RMSNorm --swiglu --disable-bias-linear
  --untie-embeddings-and-output-weights --position-embedding-type rope
  --attention-dropout 0.0 --hidden-dropout 0.0 --init-method-std 0.02
  --moe-grouped-gemm --moe-token-dispatcher-type alltoall
)
case $family in
  mixtral)
    FAMILY=(
      --ffn-hidden-size 512 --group-query-attention --num-query-groups 4
      --num-experts 8 --moe-router-topk 2 --moe-router-load-balancing-type aux_loss
      --moe-aux-loss-coeff 1e-2 --moe-z-loss-coeff 1e-3
    )
    ;;
  qwen3-moe)
    FAMILY=(
      --ffn-hidden-size 512 --group-query-attention --num-query-groups 4 --kv-channels 32
      --qk-layernorm --rotary-base 1000000
      --num-experts 16 --moe-ffn-hidden-size 128 --moe-router-topk 4
      --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-3
    )
    ;;
  deepseek-v3)
    FAMILY=(
      --ffn-hidden-size 512 --multi-latent-attention --q-lora-rank 96 --kv-lora-rank 64
      --qk-head-dim 32 --qk-pos-emb-head-dim 16 --v-head-dim 32 --qk-layernorm
      --moe-layer-freq '[0]*1+[1]*3' --num-experts 16 --moe-ffn-hidden-size 128
      --moe-shared-expert-intermediate-size 128 --moe-router-topk 4
      --moe-router-score-function sigmoid --moe-router-enable-expert-bias
      --moe-router-bias-update-rate 1e-3 --moe-router-num-groups 4 --moe-router-group-topk 2
      --moe-router-topk-scaling-factor 2.5 --moe-router-dtype fp32
      --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-4
      --mtp-num-layers 1 --mtp-loss-scaling-factor 0.1
    )
    ;;
  *)
    echo "usage: examples/train_tiny.sh {mixtral|qwen3-moe|deepseek-v3} [moe-train flags]" >&2
    exit 2
    ;;
esac

for file in "$build_dir/tools/moe-train" "$dataset.bin" "$dataset.idx" "$tokenizer"; do
  [[ -e $file ]] || { echo "train_tiny: $file is missing (run scripts/setup.sh)" >&2; exit 1; }
done
rm -rf "$run_dir/checkpoints" "$run_dir/train.csv"
mkdir -p "$run_dir"

OMP_NUM_THREADS=1 mpirun --allow-run-as-root --oversubscribe --bind-to none -np 2 \
  "$build_dir/tools/moe-train" "${COMMON_MODEL[@]}" "${FAMILY[@]}" \
  --expert-model-parallel-size 2 --use-distributed-optimizer --bf16 \
  --tokenizer-type Llama2Tokenizer --tokenizer-model "$tokenizer" --data-path "$dataset" \
  --split 98,2,0 --micro-batch-size 8 --global-batch-size 16 --lr 2e-3 --min-lr 2e-4 \
  --lr-decay-style cosine --lr-warmup-iters 5 --weight-decay 0.1 --clip-grad 1.0 \
  --train-iters "$iterations" --log-interval 10 --eval-interval 1000 --eval-iters 2 \
  --save "$run_dir/checkpoints" --save-interval "$iterations" --log-file "$run_dir/train.csv" "$@"

echo "train_tiny: $family lm loss by logged iteration:"
awk -F, '$2 == "lm loss" && ($1 == 1 || $1 % 10 == 0) { printf "  iteration %4d  lm loss %.3f\n", $1, $3 }' \
  "$run_dir/train.csv"
