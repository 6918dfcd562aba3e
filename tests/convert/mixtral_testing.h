// A tiny Mixtral model shared by the converter tests.
#pragma once

#include <fstream>
#include <memory>
#include <string>

#include "moe/comm/parallel_state.h"
#include "moe/convert/hf_moe.h"
#include "moe/model/gpt_model.h"

namespace moe::testing {

using convert::hf_moe::HfMoeConfig;

// Odd sizes everywhere: 3 query heads per kv group, 3 experts, vocab 37.
inline HfMoeConfig tiny_config() {
  HfMoeConfig c;
  c.vocab_size = 37;
  c.hidden_size = 24;
  c.intermediate_size = 10;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 6;
  c.num_key_value_heads = 2;
  c.num_local_experts = 3;
  c.num_experts_per_tok = 2;
  c.max_position_embeddings = 64;
  c.rope_theta = 10000;
  c.rms_norm_eps = 1e-6;
  return c;
}

// A GPTModel of config c on one process, parameters drawn by init_parameters(seed).
struct TinyModel {
  ParameterStore store;
  std::unique_ptr<model::GPTModel> model;
  TinyModel(const HfMoeConfig& c, DType dtype, uint64_t seed) : store(dtype) {
    model::TransformerConfig t = c.transformer_config();
    t.seq_length = 8;
    model = std::make_unique<model::GPTModel>(t, comm::single_process_state(), store);
    store.allocate();
    model->init_parameters(seed);
  }
};

// Writes `store`'s model as an HF model directory: config.json plus safetensors shards of at most
// max_shard_bytes (small values give several shards and an index).
inline void write_hf_model(const std::string& dir, const HfMoeConfig& c,
                           const ParameterStore& store, uint64_t max_shard_bytes = 4096) {
  convert::safetensors::write_checkpoint(
      dir, convert::hf_moe::moecore_to_hf(c, store, store.param_dtype()), {}, max_shard_bytes);
  std::ofstream(dir + "/config.json") << c.to_json().dump(2);
}

}  // namespace moe::testing
