// Context-parallel self-attention under mpirun: each cp rank holds its two load-balanced chunks
// of every sequence (chunks r and 2 cp - 1 - r of 2 cp), all-gathers K/V over cp and sums the
// K/V gradients back to their owners. Its output rows, input-gradient rows and (summed over cp)
// weight gradients equal one process's SelfAttention on the whole sequence. GQA (8 heads, 4
// groups), rope at global positions, attention dropout, odd chunk lengths; with 4 ranks also
// tp = 2 x cp = 2 (heads split over tp).
//
// Activations in fp64, so exactness shows: output and input-gradient rows within 1e-12 + 1e-9 *
// |reference| (the K/V gradients are partial sums added over cp in another order). Weight
// gradients are fp32 buffers (summed over cp in fp32): 1e-6 + 1e-6 * |reference| (observed:
// 2e-6 absolute on values of 16, i.e. fp32 rounding).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "model_testing.h"
#include "moe/comm/parallel_state.h"
#include "moe/model/gpt_model.h"
#include "moe/model/layers.h"
#include "moe/tensor/ops.h"
#include "support/testing.h"

namespace moe::model {
namespace {

using moe::testing::random_normal;

TransformerConfig attention_config() {
  TransformerConfig c;
  c.hidden_size = 16;
  c.num_attention_heads = 8;
  c.kv_channels = 4;
  c.group_query_attention = true;
  c.num_query_groups = 4;
  c.position_embedding_type = "rope";
  c.add_bias_linear = false;
  c.attention_dropout = 0.2f;
  return c;
}

// The rows of `full` ([seq * batch, h], row s * batch + b) at this cp rank's positions.
Tensor rows_of_rank(const Tensor& full, const comm::ContextParallel& cp, int64_t seq,
                    int64_t batch) {
  const int64_t local_seq = seq / cp.size();
  Tensor local = Tensor::empty({local_seq * batch, full.dim(1)}, full.dtype());
  for (int64_t s = 0; s < local_seq; ++s) {
    const int64_t global = cp.global_position(s, local_seq);
    local.rows(s * batch, (s + 1) * batch)
        .copy_from(full.rows(global * batch, (global + 1) * batch));
  }
  return local;
}

void check_attention(int tp, int cp_size, int64_t chunk) {
  SCOPED_TRACE("tp " + std::to_string(tp) + ", cp " + std::to_string(cp_size) + ", chunk " +
               std::to_string(chunk));
  comm::ParallelState state = comm::initialize_model_parallel({.tp = tp, .cp = cp_size});
  const comm::ContextParallel cp = state.context_parallel();
  TransformerConfig config = attention_config();
  const int64_t batch = 2, seq = 2 * cp_size * chunk;

  ParameterStore reference_store(DType::F64);
  SelfAttention reference(reference_store, "attention", config, TensorParallel{});
  reference_store.allocate();
  testing::randomize(reference_store, 3);
  ParameterStore store(DType::F64);
  SelfAttention attention(store, "attention", config, TensorParallel{state.tp_group, false}, cp);
  store.allocate();
  for (int i = 0; i < store.count(); ++i) {
    const ParamSpec& spec = store.spec(ParamHandle{i});
    Tensor local = store.param(ParamHandle{i});
    copy_global_block(reference_store.param(reference_store.find(spec.name)), spec, local);
  }

  const int64_t h = config.hidden_size;
  Tensor x = random_normal({seq * batch, h}, 11, 1.0f, DType::F64);
  Tensor probe = random_normal({seq * batch, h}, 12, 1.0f, DType::F64);
  SelfAttention::Context reference_ctx;
  Tensor reference_out =
      reference.forward(reference_store, x, {seq, batch}, 5, true, reference_ctx);
  Tensor reference_dx = reference.backward(reference_store, reference_ctx, probe);

  SelfAttention::Context ctx;
  const BatchShape local_shape{seq / cp_size, batch};
  Tensor out = attention.forward(store, rows_of_rank(x, cp, seq, batch), local_shape, 5, true, ctx);
  Tensor dx = attention.backward(store, ctx, rows_of_rank(probe, cp, seq, batch));
  EXPECT_TENSORS_CLOSE(out, rows_of_rank(reference_out, cp, seq, batch), 1e-12, 1e-9);
  EXPECT_TENSORS_CLOSE(dx, rows_of_rank(reference_dx, cp, seq, batch), 1e-12, 1e-9);
  // Each cp rank's weight gradients cover its own query rows: their sum is the whole sequence's.
  Tensor grads = store.flat_grads(ParamGroup::kDense);
  comm::all_reduce(grads, cp.group);
  for (int i = 0; i < store.count(); ++i) {
    const ParamSpec& spec = store.spec(ParamHandle{i});
    Tensor expected(spec.shape);
    copy_global_block(reference_store.grad(reference_store.find(spec.name)), spec, expected);
    EXPECT_TENSORS_CLOSE(store.grad(ParamHandle{i}), expected, 1e-6, 1e-6) << spec.name;
  }
}

TEST(ContextParallelAttention, MatchesOneProcessOnOddChunks) {
  const int world = comm::ProcessGroup::world().size();
  for (int64_t chunk : {1, 5, 17}) {
    check_attention(1, world, chunk);
    if (world == 4) check_attention(2, 2, chunk);
  }
}

// Megatron's get_batch_on_this_cp_rank on a [b, S] batch: rank r keeps chunks r and 2 cp - 1 - r.
TEST(ContextParallelBatch, SplitKeepsTheLoadBalancedChunks) {
  const int world = comm::ProcessGroup::world().size();
  comm::ParallelState state = comm::initialize_model_parallel({.cp = world});
  const comm::ContextParallel cp = state.context_parallel();
  const int64_t chunk = 3, seq = 2 * world * chunk;
  Tensor batch({2, seq}, DType::I64);
  for (int64_t i = 0; i < batch.numel(); ++i) batch.data<int64_t>()[i] = i;
  Tensor local = split_for_context_parallel(batch, cp);
  ASSERT_EQ(local.shape(), (Shape{2, 2 * chunk}));
  const int r = cp.rank();
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t i = 0; i < 2 * chunk; ++i) {
      const int64_t global = i < chunk ? r * chunk + i : (2 * world - 1 - r) * chunk + i - chunk;
      EXPECT_EQ(local.data<int64_t>()[b * 2 * chunk + i], b * seq + global)
          << "rank " << r << " sequence " << b << " index " << i;
      EXPECT_EQ(cp.global_position(i, 2 * chunk), global);
    }
  }
  Tensor odd({1, 2 * world * chunk + 2}, DType::I64);
  EXPECT_EQ(moe::testing::error_text([&] { split_for_context_parallel(odd, cp); }),
            "sequence length (" + std::to_string(odd.dim(1)) +
                ") must be a multiple of 2 x context_parallel_size (" + std::to_string(2 * world) +
                ")");
}

}  // namespace
}  // namespace moe::model
