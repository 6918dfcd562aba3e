#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <numeric>

#include "moe/moe/experts.h"
#include "moe/tensor/ops.h"
#include "moe_test_util.h"
#include "support/testing.h"

namespace moe {
namespace {

// A set of experts over its own store, weights from a fixed seed and random biases.
struct ExpertsFixture {
  ExpertsFixture(const MoEConfig& config, DType dtype, bool grouped)
      : store(dtype),
        experts(grouped
                    ? std::unique_ptr<Experts>(std::make_unique<GroupedMLP>(
                          config, store, "experts", ExpertPlacement::all(config.num_experts)))
                    : std::unique_ptr<Experts>(std::make_unique<SequentialMLP>(
                          config, store, "experts", ExpertPlacement::all(config.num_experts)))) {
    store.allocate();
    experts->init_parameters(5, 0.4f, 0.3f);
    if (config.add_bias_linear) {
      Tensor fc1_bias = experts->fc1_bias(), fc2_bias = experts->fc2_bias();
      fc1_bias.copy_from(testing::random_normal(fc1_bias.shape(), 6, 0.2f));
      fc2_bias.copy_from(testing::random_normal(fc2_bias.shape(), 7, 0.2f));
    }
  }
  ParameterStore store;
  std::unique_ptr<Experts> experts;
};

MoEConfig experts_config(ExpertActivation activation, bool bias = true) {
  MoEConfig config = testing::small_config(6, 4, 2, 5);
  config.activation = activation;
  config.add_bias_linear = bias;
  return config;
}

// Runs forward and backward; returns {output, d rows} and leaves the gradients in the store.
std::pair<Tensor, Tensor> run(const Experts& experts, const Tensor& rows,
                              const std::vector<int64_t>& groups, const Tensor& grad_output) {
  ExpertsContext ctx;
  Tensor output = experts.forward(rows, groups, ctx);
  Tensor grad_rows = experts.backward(ctx, grad_output);
  return {output, grad_rows};
}

void expect_bitwise_equal(const Tensor& a, const Tensor& b, const char* what) {
  ASSERT_EQ(a.nbytes(), b.nbytes()) << what;
  EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0) << what << " differs";
}

TEST(Experts, SequentialAndGroupedGiveIdenticalResults) {
  const std::vector<int64_t> groups = {5, 0, 17, 1};
  for (DType dtype : {DType::F32, DType::BF16}) {
    for (ExpertActivation activation : {ExpertActivation::kSwiGLU, ExpertActivation::kGeLU}) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + " " + std::string(name_of(activation)));
      MoEConfig config = experts_config(activation);
      ExpertsFixture sequential(config, dtype, false), grouped(config, dtype, true);
      Tensor rows = testing::random_normal({23, 6}, 8, 1.0f, dtype);
      Tensor grad_output = testing::random_normal({23, 6}, 9, 1.0f, dtype);
      auto [out_s, grad_s] = run(*sequential.experts, rows, groups, grad_output);
      auto [out_g, grad_g] = run(*grouped.experts, rows, groups, grad_output);
      expect_bitwise_equal(out_s, out_g, "output");
      expect_bitwise_equal(grad_s, grad_g, "d rows");
      for (ParamGroup group : {ParamGroup::kExpert}) {
        expect_bitwise_equal(sequential.store.flat_grads(group), grouped.store.flat_grads(group),
                             "expert gradients");
      }
    }
  }
}

TEST(Experts, GradientsMatchFiniteDifferences) {
  for (bool grouped : {false, true}) {
    for (ExpertActivation activation : {ExpertActivation::kSwiGLU, ExpertActivation::kGeLU}) {
      SCOPED_TRACE(std::string(grouped ? "grouped " : "sequential ") +
                   std::string(name_of(activation)));
      MoEConfig config = experts_config(activation);
      ExpertsFixture fixture(config, DType::F64, grouped);
      const Experts& experts = *fixture.experts;
      const std::vector<int64_t> groups = {3, 0, 4, 2};
      Tensor rows = testing::random_normal({9, 6}, 10, 1.0f, DType::F64);
      Tensor probe = testing::random_normal({9, 6}, 11, 1.0f, DType::F64);
      auto objective = [&] {
        ExpertsContext ctx;
        return testing::dot(experts.forward(rows, groups, ctx), probe);
      };
      auto [output, grad_rows] = run(experts, rows, groups, probe);
      EXPECT_TRUE(testing::check_moe_gradient(rows, grad_rows, objective, "rows"));
      EXPECT_TRUE(testing::check_moe_gradient(experts.fc1_weight(), experts.fc1_weight_grad(),
                                              objective, "fc1 weight"));
      EXPECT_TRUE(testing::check_moe_gradient(experts.fc2_weight(), experts.fc2_weight_grad(),
                                              objective, "fc2 weight"));
      EXPECT_TRUE(testing::check_moe_gradient(experts.fc1_bias(), experts.fc1_bias_grad(),
                                              objective, "fc1 bias"));
      EXPECT_TRUE(testing::check_moe_gradient(experts.fc2_bias(), experts.fc2_bias_grad(),
                                              objective, "fc2 bias"));
    }
  }
}

TEST(Experts, ExpertsWithoutTokensWorkAndGetNoGradient) {
  MoEConfig config = experts_config(ExpertActivation::kSwiGLU);
  ExpertsFixture fixture(config, DType::F32, true);
  const Experts& experts = *fixture.experts;
  Tensor rows = testing::random_normal({3, 6}, 12);
  auto [output, grad_rows] = run(experts, rows, {0, 3, 0, 0}, testing::random_normal({3, 6}, 13));
  EXPECT_EQ(output.dim(0), 3);
  Tensor fc1_grad = experts.fc1_weight_grad(), fc2_grad = experts.fc2_weight_grad();
  for (int64_t e : {0, 2, 3}) {
    EXPECT_EQ(sum(fc1_grad.rows(e, e + 1)), 0.0) << "expert " << e;
    EXPECT_EQ(sum(fc2_grad.rows(e, e + 1)), 0.0) << "expert " << e;
  }
  EXPECT_NE(sum(fc1_grad.rows(1, 2)), 0.0);
  // No rows at all.
  auto [empty_output, empty_grad] = run(experts, Tensor({0, 6}), {0, 0, 0, 0}, Tensor({0, 6}));
  EXPECT_EQ(empty_output.numel(), 0);
  EXPECT_EQ(empty_grad.numel(), 0);
}

TEST(Experts, HalfPrecisionTracksFp32) {
  const std::vector<int64_t> groups = {4, 9, 0, 3};
  MoEConfig config = experts_config(ExpertActivation::kSwiGLU);
  ExpertsFixture full(config, DType::F32, true);
  Tensor rows = testing::random_normal({16, 6}, 14);
  Tensor grad_output = testing::random_normal({16, 6}, 15);
  auto [out32, grad32] = run(*full.experts, rows, groups, grad_output);
  for (DType dtype : {DType::BF16, DType::F16}) {
    ExpertsFixture half(config, dtype, true);
    // The same weights, rounded to the half type.
    half.store.flat_params(ParamGroup::kExpert)
        .copy_from(full.store.flat_params(ParamGroup::kExpert));
    auto [out, grad] = run(*half.experts, rows.to(dtype), groups, grad_output.to(dtype));
    double tolerance = dtype == DType::BF16 ? 3e-2 : 5e-3;
    EXPECT_TENSORS_CLOSE(out.to(DType::F32), out32, tolerance, tolerance);
    EXPECT_TENSORS_CLOSE(grad.to(DType::F32), grad32, tolerance, tolerance);
    EXPECT_TENSORS_CLOSE(half.store.flat_grads(ParamGroup::kExpert),
                         full.store.flat_grads(ParamGroup::kExpert), tolerance, tolerance);
  }
}

TEST(Experts, BadInputsNameTheProblem) {
  MoEConfig config = experts_config(ExpertActivation::kGeLU);
  ExpertsFixture fixture(config, DType::F32, false);
  ExpertsContext ctx;
  testing::expect_error_containing(
      [&] {
        fixture.experts->forward(Tensor({5, 6}), std::vector<int64_t>{1, 1, 1, 1}, ctx);
      },
      "tokens_per_expert sums to 4 but rows has 5 rows");
  testing::expect_error_containing(
      [&] {
        fixture.experts->forward(Tensor({4, 6}, DType::BF16), std::vector<int64_t>{1, 1, 1, 1},
                                 ctx);
      },
      "rows are bf16 but the parameters are fp32");
  EXPECT_THROW(fixture.experts->backward(ctx, Tensor({4, 6})), Error);
}

// Copies the block of `whole` (the global tensor) that `spec` describes into `local`.
void copy_global_block(const Tensor& whole, const ParamSpec& spec, Tensor local) {
  const size_t dims = spec.shape.size();
  std::vector<int64_t> index(dims, 0);
  for (int64_t i = 0; i < local.numel(); ++i) {
    int64_t flat = 0, rest = i;
    for (size_t d = dims; d-- > 0;) {
      index[d] = rest % spec.shape[d];
      rest /= spec.shape[d];
    }
    for (size_t d = 0; d < dims; ++d)
      flat = flat * spec.global_shape[d] + index[d] + spec.global_offset[d];
    local.set(i, whole.get(flat));
  }
}

// Expert tensor parallelism: the ffn slices' outputs and input gradients sum to the whole
// expert's, and each slice's weight gradients are the whole expert's gradients at its slice.
TEST(Experts, TensorParallelSlicesSumToTheWholeExpert) {
  for (ExpertActivation activation : {ExpertActivation::kSwiGLU, ExpertActivation::kGeLU}) {
    for (int64_t slices : {2, 3}) {
      SCOPED_TRACE(std::string(name_of(activation)) + " x" + std::to_string(slices));
      MoEConfig config = experts_config(activation);
      config.ffn_hidden_size = 6;
      ExpertsFixture whole(config, DType::F64, true);
      const std::vector<int64_t> groups = {3, 0, 4, 2};
      Tensor rows = testing::random_normal({9, 6}, 30, 1.0f, DType::F64);
      Tensor grad_output = testing::random_normal({9, 6}, 31, 1.0f, DType::F64);
      auto [out, grad_rows] = run(*whole.experts, rows, groups, grad_output);
      Tensor out_sum({9, 6}, DType::F64), grad_rows_sum({9, 6}, DType::F64);
      for (int64_t rank = 0; rank < slices; ++rank) {
        ParameterStore store(DType::F64);
        ExpertPlacement placement = ExpertPlacement::all(4);
        placement.tp_rank = rank;
        placement.tp_size = slices;
        GroupedMLP part(config, store, "experts", placement);
        store.allocate();
        for (int i = 0; i < store.count(); ++i) {  // this slice of the whole expert's values
          const ParamSpec& spec = store.spec(ParamHandle{i});
          copy_global_block(whole.store.param(whole.store.find(spec.name)), spec,
                            store.param(ParamHandle{i}));
        }
        auto [part_out, part_grad_rows] = run(part, rows, groups, grad_output);
        add(out_sum, part_out, out_sum);
        add(grad_rows_sum, part_grad_rows, grad_rows_sum);
        for (int i = 0; i < store.count(); ++i) {
          const ParamSpec& spec = store.spec(ParamHandle{i});
          Tensor expected(spec.shape);
          copy_global_block(whole.store.grad(whole.store.find(spec.name)), spec, expected);
          EXPECT_TENSORS_CLOSE(store.grad(ParamHandle{i}), expected, 1e-6, 1e-5) << spec.name;
        }
        // Initialisation slices the whole expert too.
        ParameterStore init_store(DType::F32), whole_init_store(DType::F32);
        GroupedMLP init_part(config, init_store, "experts", placement);
        GroupedMLP init_whole(config, whole_init_store, "experts", ExpertPlacement::all(4));
        init_store.allocate();
        whole_init_store.allocate();
        init_part.init_parameters(9, 0.1f, 0.2f);
        init_whole.init_parameters(9, 0.1f, 0.2f);
        for (int i = 0; i < init_store.count(); ++i) {
          const ParamSpec& spec = init_store.spec(ParamHandle{i});
          Tensor expected(spec.shape);
          copy_global_block(whole_init_store.param(whole_init_store.find(spec.name)), spec,
                            expected);
          EXPECT_TENSORS_CLOSE(init_store.param(ParamHandle{i}), expected, 0, 0) << spec.name;
        }
      }
      EXPECT_TENSORS_CLOSE(out_sum, out, 1e-12, 1e-12);
      EXPECT_TENSORS_CLOSE(grad_rows_sum, grad_rows, 1e-12, 1e-12);
    }
  }
  ParameterStore store;
  ExpertPlacement placement = ExpertPlacement::all(4);
  placement.tp_size = 4;  // ffn 5 does not split in four
  testing::expect_error_containing(
      [&] { GroupedMLP bad(experts_config(ExpertActivation::kGeLU), store, "bad", placement); },
      "the expert ffn size (5) is not divisible by the expert tensor parallel size (4)");
}

TEST(Experts, ParametersDeclaredWithGlobalShapes) {
  MoEConfig config = experts_config(ExpertActivation::kSwiGLU);
  ParameterStore store;
  GroupedMLP experts(config, store, "layer.experts", ExpertPlacement{4, 2, 2});
  store.allocate();
  const ParamSpec& fc1 = store.spec(store.find("layer.experts.linear_fc1.weight"));
  EXPECT_EQ(fc1.shape, (Shape{2, 6, 2, 5}));  // [E_local, H, gate|up, ffn]
  EXPECT_EQ(fc1.global_shape, (Shape{4, 6, 2, 5}));
  EXPECT_EQ(fc1.global_offset, (Shape{2, 0, 0, 0}));
  EXPECT_EQ(fc1.group, ParamGroup::kExpert);
  EXPECT_EQ(store.spec(store.find("layer.experts.linear_fc2.weight")).shape, (Shape{2, 5, 6}));
  EXPECT_FALSE(store.spec(store.find("layer.experts.linear_fc2.bias")).weight_decay);
  // Expert 2's weights do not depend on which rank holds it.
  ParameterStore all_store;
  GroupedMLP all(config, all_store, "layer.experts", ExpertPlacement::all(4));
  all_store.allocate();
  experts.init_parameters(3, 0.1f, 0.1f);
  all.init_parameters(3, 0.1f, 0.1f);
  EXPECT_TENSORS_CLOSE(experts.fc1_weight().rows(0, 2), all.fc1_weight().rows(2, 4), 0, 0);
  EXPECT_TENSORS_CLOSE(experts.fc2_weight().rows(0, 2), all.fc2_weight().rows(2, 4), 0, 0);
}

}  // namespace
}  // namespace moe
