// Multi-latent attention under mpirun: tensor parallelism over heads, with and without sequence
// parallelism, gives the single process's output, input gradient and parameter gradients. Each
// rank builds the single-process layer too, copies its blocks of the same weights and compares
// its own rows and blocks. With sequence parallelism the replicated parameters (down projections,
// norms, linear_proj's bias) see only this rank's rows; their gradients are summed over tp here,
// as the model's sequence-parallel gradient sync does.
//
// Tolerance (fp32, the model tests' own): outputs and input gradients (of order 1) within
// 1e-6 + 1e-4 relative; gradients within 1e-8 + 1e-4 relative (different reduction orders).
#include <gtest/gtest.h>

#include <string>

#include "model_testing.h"
#include "moe/comm/parallel_state.h"
#include "moe/model/mla.h"
#include "support/testing.h"

namespace moe::model {
namespace {

using moe::testing::random_normal;

TransformerConfig parallel_config(int q_lora_rank) {
  TransformerConfig c;
  c.hidden_size = 16;
  c.num_attention_heads = 4;
  c.padded_vocab_size = 16;
  c.seq_length = 8;
  testing::set_small_mla(c, q_lora_rank);
  c.qk_layernorm = true;
  c.normalization = "LayerNorm";  // norm biases: more replicated gradients to sum
  c.attention_dropout = 0.1f;     // global (batch, head, query, key) mask indices
  return c;
}

void check_tensor_parallel(bool sequence_parallel, int q_lora_rank) {
  int tp = comm::ProcessGroup::world().size();
  comm::ParallelState state = comm::initialize_model_parallel({tp, 1, 1, 1, 1});
  TransformerConfig config = parallel_config(q_lora_rank);
  config.sequence_parallel = sequence_parallel;
  BatchShape shape{8, 2};
  const int64_t hidden = config.hidden_size, rows = shape.rows();
  Tensor x = random_normal({rows, hidden}, 31, 1.0f);
  Tensor probe = random_normal({rows, hidden}, 32, 1.0f);

  ParameterStore reference_store;
  TransformerConfig single = config;
  single.sequence_parallel = false;
  MultiLatentAttention reference(reference_store, "attn", single, TensorParallel{});
  reference_store.allocate();
  testing::randomize(reference_store, 33);
  MultiLatentAttention::Context reference_saved;
  Tensor reference_out = reference.forward(reference_store, x, shape, 7, true, reference_saved);
  Tensor reference_dx = reference.backward(reference_store, reference_saved, probe);

  ParameterStore store;
  TensorParallel parallel{state.tp_group, sequence_parallel};
  MultiLatentAttention attention(store, "attn", config, parallel);
  store.allocate();
  for (int i = 0; i < store.count(); ++i) {
    const ParamSpec& spec = store.spec(ParamHandle{i});
    Tensor local = store.param(ParamHandle{i});
    copy_global_block(reference_store.param(reference_store.find(spec.name)), spec, local);
  }
  int64_t block = sequence_parallel ? rows / tp : rows;
  int64_t first = sequence_parallel ? state.tp_group.rank() * block : 0;
  MultiLatentAttention::Context saved;
  Tensor out =
      attention.forward(store, x.rows(first, first + block).clone(), shape, 7, true, saved);
  Tensor dx = attention.backward(store, saved, probe.rows(first, first + block).clone());
  std::string layout = "tp " + std::to_string(tp) + (sequence_parallel ? ", sp" : "") +
                       ", q_lora_rank " + std::to_string(q_lora_rank);
  EXPECT_TENSORS_CLOSE(out, reference_out.rows(first, first + block), 1e-6, 1e-4) << layout;
  EXPECT_TENSORS_CLOSE(dx, reference_dx.rows(first, first + block), 1e-6, 1e-4) << layout;
  for (int i = 0; i < store.count(); ++i) {
    const ParamSpec& spec = store.spec(ParamHandle{i});
    Tensor grad = store.grad(ParamHandle{i});
    if (sequence_parallel && spec.tensor_parallel_duplicate) comm::all_reduce(grad, state.tp_group);
    Tensor expected(spec.shape);
    copy_global_block(reference_store.grad(reference_store.find(spec.name)), spec, expected);
    EXPECT_TENSORS_CLOSE(grad, expected, 1e-8, 1e-4) << layout << " gradient of " << spec.name;
  }
}

TEST(MultiLatentAttentionParallel, TensorParallelEqualsSingleProcess) {
  for (int q_lora_rank : {0, 7}) {
    check_tensor_parallel(false, q_lora_rank);
  }
}

TEST(MultiLatentAttentionParallel, SequenceParallelEqualsSingleProcess) {
  for (int q_lora_rank : {0, 7}) {
    check_tensor_parallel(true, q_lora_rank);
  }
}

}  // namespace
}  // namespace moe::model
