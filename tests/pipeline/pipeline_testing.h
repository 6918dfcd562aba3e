// A tiny MoE GPT and its micro-batches, shared by the pipeline tests.
#pragma once

#include <cstdint>

#include "../model/model_testing.h"
#include "moe/model/config.h"
#include "moe/pipeline/schedules.h"
#include "moe/tensor/rng.h"
#include "moe/tensor/tensor.h"

namespace moe::pipeline::testing {

// Four layers, MoE at 0 and 3 (so pp = 2 and pp = 4 both put MoE and dense layers on different
// stages), dropout, aux and z losses on; untied output layer (required with pp > 1).
inline model::TransformerConfig tiny_moe_config() {
  model::TransformerConfig c;
  c.num_layers = 4;
  c.hidden_size = 16;
  c.num_attention_heads = 4;
  c.ffn_hidden_size = 32;
  c.padded_vocab_size = 32;
  c.seq_length = 8;
  c.normalization = "RMSNorm";
  c.position_embedding_type = "rope";
  c.swiglu = true;
  c.add_bias_linear = false;
  c.untie_embeddings_and_output_weights = true;
  c.init_method_std = 0.2f;
  c.num_experts = 4;
  c.moe_layer_pattern = {1, 0, 0, 1};
  c.moe.moe_router_topk = 2;
  c.moe.moe_aux_loss_coeff = 0.01;
  c.moe.moe_z_loss_coeff = 0.001;
  return c;
}

constexpr int64_t kMicroBatchSize = 2;

// Global micro-batch g: its own tokens, labels, a loss mask with some tokens masked out, and
// dropout seed, so every layout that runs micro-batch g sees the same data.
inline MicroBatch global_micro_batch(const model::TransformerConfig& config, int global_index) {
  const uint64_t g = uint64_t(global_index);
  MicroBatch batch;
  batch.tokens = model::testing::random_tokens(kMicroBatchSize, config.seq_length,
                                               config.padded_vocab_size, 100 + g);
  batch.labels = model::testing::random_tokens(kMicroBatchSize, config.seq_length,
                                               config.padded_vocab_size, 200 + g);
  batch.loss_mask = Tensor({kMicroBatchSize, config.seq_length});
  Rng rng(300 + g);
  for (int64_t i = 0; i < batch.loss_mask.numel(); ++i) {
    batch.loss_mask.set(i, rng.uniform() < 0.8f ? 1.0f : 0.0f);
  }
  batch.dropout_seed = 400 + g;
  return batch;
}

// Micro-batch i of data-parallel replica `replica` (each replica takes `count` in a row).
inline MicroBatchProvider replica_provider(const model::TransformerConfig& config, int replica,
                                           int count) {
  return
      [config, replica, count](int i) { return global_micro_batch(config, replica * count + i); };
}

}  // namespace moe::pipeline::testing
