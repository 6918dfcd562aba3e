// Kernel harness for moe/tensor/gemm.h: sgemm in all four transpose combinations against
// sgemm_reference, and every grouped GEMM kernel in every form, dtype, output dtype and
// accumulate mode against grouped_gemm_reference, on group sizes that include empty groups and
// the awkward row counts; bad inputs and the text of their errors.
#include <omp.h>

#include <cmath>
#include <limits>
#include <ostream>
#include <string>
#include <tuple>

#include "moe/tensor/gemm.h"
#include "moe/tensor/rng.h"
#include "support/kernel_harness.h"
#include "support/testing.h"

namespace moe {

// gtest prints a kernel parameter by name.
void PrintTo(GroupedGemmKernel kernel, std::ostream* out) {
  *out << grouped_gemm_kernel_name(kernel);
}

namespace {

using testing::error_text;
using testing::random_normal;
using testing::tensors_close;

const float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---- sgemm ----

class SgemmHarness : public ::testing::TestWithParam<std::tuple<bool, bool>> {};

TEST_P(SgemmHarness, MatchesReferenceWithPaddedLeadingDimensions) {
  auto [transpose_a, transpose_b] = GetParam();
  struct Scaling {
    float alpha, beta;
  };
  // beta == 0 must ignore C entirely, even NaN (outputs are often uninitialised).
  const Scaling scalings[] = {{1.0f, 0.0f}, {-0.5f, 1.25f}};
  const std::pair<int64_t, int64_t> widths[] = {{7, 1}, {33, 19}, {1, 130}, {16, 0}};
  uint64_t seed = 1;
  for (int64_t m : testing::kHarnessRows) {
    for (auto [n, k] : widths) {
      for (Scaling s : scalings) {
        // Leading dimensions 3 past the row length, so strides are exercised.
        int64_t a_rows = transpose_a ? k : m, a_cols = transpose_a ? m : k;
        int64_t b_rows = transpose_b ? n : k, b_cols = transpose_b ? k : n;
        Tensor a = random_normal({a_rows, a_cols + 3}, ++seed);
        Tensor b = random_normal({b_rows, b_cols + 3}, ++seed);
        Tensor c = random_normal({m, n + 3}, ++seed);
        if (s.beta == 0.0f) c.fill(kNaN);
        Tensor expected = c.clone();
        sgemm(transpose_a, transpose_b, m, n, k, s.alpha, a.data<float>(), a_cols + 3,
              b.data<float>(), b_cols + 3, s.beta, c.data<float>(), n + 3);
        sgemm_reference(transpose_a, transpose_b, m, n, k, s.alpha, a.data<float>(), a_cols + 3,
                        b.data<float>(), b_cols + 3, s.beta, expected.data<float>(), n + 3);
        // Compare the m x n block only: the padding columns must stay as they were.
        for (int64_t i = 0; i < m; ++i) {
          Tensor row = c.rows(i, i + 1), expected_row = expected.rows(i, i + 1);
          ASSERT_TRUE(tensors_close(row.reshape({n + 3}).to(DType::F32),
                                    expected_row.reshape({n + 3}), 1e-4, 1e-5))
              << "m=" << m << " n=" << n << " k=" << k << " alpha=" << s.alpha << " beta=" << s.beta
              << " row " << i;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Transposes, SgemmHarness,
                         ::testing::Combine(::testing::Bool(), ::testing::Bool()),
                         [](const ::testing::TestParamInfo<SgemmHarness::ParamType>& info) {
                           return std::string(std::get<0>(info.param) ? "At" : "A") +
                                  (std::get<1>(info.param) ? "Bt" : "B");
                         });

// ---- grouped GEMM ----

struct GroupedCase {
  std::vector<int64_t> group_rows;
  int64_t k, n;
};

// Empty group lists, empty groups between full ones, the awkward row counts, widths of 1 and odd
// widths; the last three cross every blocking boundary of the packed kernel in each form (row
// tiles of up to 528, depth chunks of 256, several column tiles) while staying cheap.
const std::vector<GroupedCase> kGroupedCases = {
    {{}, 5, 7},
    {{0}, 7, 5},
    {{0, 0}, 3, 4},
    {{1, 0, 5}, 17, 1},
    {{17, 0, 129, 0}, 5, 33},
    {{5, 1}, 1, 19},
    {{129}, 37, 21},
    {{0, 600, 3}, 9, 37},
    {{2, 270}, 530, 20},
    {{1, 30}, 20, 600},
};

using GroupedParam = std::tuple<GemmForm, DType, bool, bool>;  // form, input, fp32 out, accumulate

// Tolerance of a grouped product of depth `depth` on N(0, 1) data in the output dtype: fp32
// accumulation error grows with depth; half outputs may differ by one unit in the last place.
testing::Tolerance grouped_tolerance(DType output, int64_t depth) {
  double accumulation = 2e-6 * double(depth + 1);
  switch (output) {
    case DType::F64:
      return {1e-10, 1e-12};
    case DType::F32:
      return {accumulation, 1e-5};
    case DType::BF16:
      return {accumulation + 2e-3, 8e-3};
    default:
      return {accumulation + 1e-3, 2e-3};  // F16
  }
}

// Every form x input dtype x allowed output dtype (fp32, or the input's own) x accumulate.
std::vector<GroupedParam> grouped_params() {
  std::vector<GroupedParam> params;
  for (GemmForm form : {GemmForm::kForward, GemmForm::kGradInput, GemmForm::kGradWeight})
    for (DType input : testing::kHarnessDtypes)
      for (bool fp32_out : {false, true})
        for (bool accumulate : {false, true})
          if (!(fp32_out && (input == DType::F32 || input == DType::F64)))
            params.emplace_back(form, input, fp32_out, accumulate);
  return params;
}

class GroupedGemmHarness : public ::testing::TestWithParam<GroupedParam> {
 protected:
  GemmForm form() const { return std::get<0>(GetParam()); }
  DType input() const { return std::get<1>(GetParam()); }
  DType output() const { return std::get<2>(GetParam()) ? DType::F32 : input(); }
  bool accumulate() const { return std::get<3>(GetParam()); }
};

// Operand shapes of one case: a, b and c as the GemmForm defines them.
struct Operands {
  Tensor a, b, c;
};

Operands make_operands(GemmForm form, const GroupedCase& gc, DType input, DType output,
                       bool accumulate, uint64_t seed) {
  int64_t rows = 0, groups = int64_t(gc.group_rows.size());
  for (int64_t r : gc.group_rows) rows += r;
  Operands o;
  switch (form) {
    case GemmForm::kForward:
      o.a = random_normal({rows, gc.k}, seed, 1.0f, input);
      o.b = random_normal({groups, gc.k, gc.n}, seed + 1, 1.0f, input);
      o.c = random_normal({rows, gc.n}, seed + 2, 1.0f, output);
      break;
    case GemmForm::kGradInput:
      o.a = random_normal({rows, gc.n}, seed, 1.0f, input);
      o.b = random_normal({groups, gc.k, gc.n}, seed + 1, 1.0f, input);
      o.c = random_normal({rows, gc.k}, seed + 2, 1.0f, output);
      break;
    case GemmForm::kGradWeight:
      o.a = random_normal({rows, gc.k}, seed, 1.0f, input);
      o.b = random_normal({rows, gc.n}, seed + 1, 1.0f, input);
      o.c = random_normal({groups, gc.k, gc.n}, seed + 2, 1.0f, output);
      break;
  }
  if (!accumulate) o.c.fill(kNaN);  // an overwriting product must not read c
  return o;
}

GroupedGemmArgs args_for(GemmForm form, const GroupedCase& gc, Operands& o, bool accumulate) {
  GroupedGemmArgs args;
  args.form = form;
  args.groups = int64_t(gc.group_rows.size());
  args.group_rows = gc.group_rows.data();
  args.k = gc.k;
  args.n = gc.n;
  args.input_dtype = o.a.dtype();
  args.output_dtype = o.c.dtype();
  args.a = o.a.raw();
  args.b = o.b.raw();
  args.c = o.c.raw();
  args.accumulate = accumulate;
  return args;
}

const GroupedGemmKernel kAllKernels[] = {
    GroupedGemmKernel::kAuto, GroupedGemmKernel::kPerGroupBlas, GroupedGemmKernel::kPackedAvx2,
    GroupedGemmKernel::kPackedAvx512, GroupedGemmKernel::kPackedAvx512Bf16};
const GroupedGemmKernel kPackedKernels[] = {GroupedGemmKernel::kPackedAvx2,
                                            GroupedGemmKernel::kPackedAvx512,
                                            GroupedGemmKernel::kPackedAvx512Bf16};

// Whether `kernel` computes products of this input dtype at all (whether this CPU runs it is
// grouped_gemm_kernel_available's answer): the packed kernels have no fp64 path and the
// AVX-512 BF16 one takes bf16 only.
bool kernel_serves(GroupedGemmKernel kernel, DType input) {
  switch (kernel) {
    case GroupedGemmKernel::kPackedAvx2:
    case GroupedGemmKernel::kPackedAvx512:
      return input != DType::F64;
    case GroupedGemmKernel::kPackedAvx512Bf16:
      return input == DType::BF16;
    default:
      return true;
  }
}

// A kernel this CPU cannot run is reported as skipped, never passed over.
#define SKIP_UNLESS_AVAILABLE(kernel, input)                                           \
  if (!grouped_gemm_kernel_available((kernel), (input)))                               \
  GTEST_SKIP() << grouped_gemm_kernel_name(kernel) << " does not run on this CPU for " \
               << dtype_name(input)

// One kernel in one form, dtype, output dtype and accumulate mode.
class GroupedGemmKernelHarness
    : public ::testing::TestWithParam<std::tuple<GroupedGemmKernel, GroupedParam>> {
 protected:
  GroupedGemmKernel kernel() const { return std::get<0>(GetParam()); }
  GemmForm form() const { return std::get<0>(std::get<1>(GetParam())); }
  DType input() const { return std::get<1>(std::get<1>(GetParam())); }
  DType output() const { return std::get<2>(std::get<1>(GetParam())) ? DType::F32 : input(); }
  bool accumulate() const { return std::get<3>(std::get<1>(GetParam())); }
};

TEST_P(GroupedGemmKernelHarness, MatchesReference) {
  SKIP_UNLESS_AVAILABLE(kernel(), input());
  uint64_t seed = 100;
  for (const GroupedCase& gc : kGroupedCases) {
    seed += 10;
    Operands expected = make_operands(form(), gc, input(), output(), accumulate(), seed);
    grouped_gemm_reference(args_for(form(), gc, expected, accumulate()));
    int64_t rows = expected.a.dim(0);
    int64_t depth = form() == GemmForm::kForward     ? gc.k
                    : form() == GemmForm::kGradInput ? gc.n
                                                     : rows;
    testing::Tolerance tol = grouped_tolerance(output(), depth);
    Operands actual = make_operands(form(), gc, input(), output(), accumulate(), seed);
    grouped_gemm(args_for(form(), gc, actual, accumulate()), kernel());
    EXPECT_TRUE(tensors_close(actual.c, expected.c, tol.atol, tol.rtol))
        << "groups of " << shape_string(gc.group_rows) << ", K=" << gc.k << ", N=" << gc.n;
  }
}

std::vector<std::tuple<GroupedGemmKernel, GroupedParam>> kernel_params() {
  std::vector<std::tuple<GroupedGemmKernel, GroupedParam>> params;
  for (GroupedGemmKernel kernel : kAllKernels)
    for (const GroupedParam& param : grouped_params())
      if (kernel_serves(kernel, std::get<1>(param))) params.emplace_back(kernel, param);
  return params;
}

std::string grouped_param_name(const GroupedParam& p) {
  return std::string(gemm_form_name(std::get<0>(p))) + "_" + testing::dtype_label(std::get<1>(p)) +
         (std::get<2>(p) ? "_to_fp32" : "_to_same") +
         (std::get<3>(p) ? "_accumulate" : "_overwrite");
}

INSTANTIATE_TEST_SUITE_P(
    AllKernels, GroupedGemmKernelHarness, ::testing::ValuesIn(kernel_params()),
    [](const ::testing::TestParamInfo<std::tuple<GroupedGemmKernel, GroupedParam>>& info) {
      return std::string(grouped_gemm_kernel_name(std::get<0>(info.param))) + "_" +
             grouped_param_name(std::get<1>(info.param));
    });

TEST_P(GroupedGemmHarness, TensorFormMatchesArgsForm) {
  GroupedCase gc{{4, 0, 9}, 6, 11};
  Operands via_args = make_operands(form(), gc, input(), output(), accumulate(), 7);
  Operands via_tensors = make_operands(form(), gc, input(), output(), accumulate(), 7);
  grouped_gemm(args_for(form(), gc, via_args, accumulate()));
  grouped_gemm(form(), via_tensors.a, via_tensors.b, gc.group_rows, via_tensors.c, accumulate());
  EXPECT_TRUE(tensors_close(via_tensors.c, via_args.c, 0, 0));
}

INSTANTIATE_TEST_SUITE_P(AllForms, GroupedGemmHarness, ::testing::ValuesIn(grouped_params()),
                         [](const ::testing::TestParamInfo<GroupedParam>& info) {
                           return grouped_param_name(info.param);
                         });

// The packed kernels, one test each, so a kernel this CPU cannot run shows as skipped.
class PackedKernel : public ::testing::TestWithParam<GroupedGemmKernel> {};

// A packed kernel computes each output element in one thread in a fixed depth order, so its
// results are bitwise the same whatever the thread count (and whatever tiling the planner picks
// for it). (OpenBLAS, behind per_group_blas, is reproducible only for a fixed thread count.)
TEST_P(PackedKernel, BitwiseIdenticalForAnyThreadCount) {
  const GroupedGemmKernel kernel = GetParam();
  GroupedCase gc{{40, 0, 300, 7, 1}, 300, 200};
  int saved_threads = omp_get_max_threads();
  for (GemmForm form : {GemmForm::kForward, GemmForm::kGradInput, GemmForm::kGradWeight}) {
    for (DType dtype : {DType::F32, DType::BF16}) {
      if (!kernel_serves(kernel, dtype)) continue;
      SKIP_UNLESS_AVAILABLE(kernel, dtype);
      Tensor first;
      for (int threads : {1, 2, 3}) {
        omp_set_num_threads(threads);
        Operands o = make_operands(form, gc, dtype, dtype, true, 5);
        grouped_gemm(args_for(form, gc, o, true), kernel);
        if (!first.defined()) {
          first = o.c;
          continue;
        }
        EXPECT_TRUE(testing::same_bytes(first, o.c))
            << gemm_form_name(form) << " " << dtype_name(dtype) << " with " << threads
            << " threads";
      }
    }
  }
  omp_set_num_threads(saved_threads);
}

// A product deep enough that a tile's packed A exceeds what the fp32 packed kernels keep for every
// depth chunk at once (2 Mi words; here 300 rows x 7300 depth): they then pack A one chunk at a
// time, reusing one buffer. The results must not change.
TEST_P(PackedKernel, DeepProductsMatchReference) {
  const GroupedGemmKernel kernel = GetParam();
  GroupedCase gc{{300, 3}, 7300, 5};
  for (DType dtype : {DType::F32, DType::BF16}) {
    if (!kernel_serves(kernel, dtype)) continue;
    SKIP_UNLESS_AVAILABLE(kernel, dtype);
    Operands expected = make_operands(GemmForm::kForward, gc, dtype, DType::F32, true, 21);
    grouped_gemm_reference(args_for(GemmForm::kForward, gc, expected, true));
    const testing::Tolerance tol = grouped_tolerance(DType::F32, gc.k);
    Operands actual = make_operands(GemmForm::kForward, gc, dtype, DType::F32, true, 21);
    grouped_gemm(args_for(GemmForm::kForward, gc, actual, true), kernel);
    EXPECT_TRUE(tensors_close(actual.c, expected.c, tol.atol, tol.rtol)) << dtype_name(dtype);
  }
}

INSTANTIATE_TEST_SUITE_P(Packed, PackedKernel, ::testing::ValuesIn(kPackedKernels),
                         [](const ::testing::TestParamInfo<GroupedGemmKernel>& info) {
                           return std::string(grouped_gemm_kernel_name(info.param));
                         });

// Exact checks as CUTLASS's testbeds make them: operands of small integers (|value| <= 3), so
// every product and every partial sum is an integer far below 2^24, exact in fp32 (and in the
// bf16 and fp16 inputs); every kernel must then give exactly the integer result, whatever its
// summation order, on the awkward row counts 0, 1, 5, 17 and 129 and a depth past one chunk.
class GroupedGemmExact : public ::testing::TestWithParam<GroupedGemmKernel> {};

Tensor small_integers(const Shape& shape, DType dtype, Rng& rng) {
  Tensor t = Tensor::empty(shape, dtype);
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, float(int64_t(rng.below(7)) - 3));
  return t;
}

// c (+)= the grouped product, in int64 from the operands' integer values.
std::vector<int64_t> integer_product(GemmForm form, const GroupedCase& gc, const Operands& o,
                                     bool accumulate) {
  const auto at = [](const Tensor& t, int64_t i) { return int64_t(testing::value_at(t, i)); };
  std::vector<int64_t> c(size_t(o.c.numel()));
  for (int64_t i = 0; i < o.c.numel(); ++i) c[size_t(i)] = accumulate ? at(o.c, i) : 0;
  const int64_t K = gc.k, N = gc.n;
  int64_t row = 0;
  for (size_t g = 0; g < gc.group_rows.size(); ++g) {
    const int64_t G = int64_t(g);
    for (int64_t r = row; r < row + gc.group_rows[g]; ++r) {
      for (int64_t i = 0; i < K; ++i) {
        for (int64_t j = 0; j < N; ++j) {
          switch (form) {
            case GemmForm::kForward:  // c[r, j] += a[r, i] * b[g, i, j]
              c[size_t(r * N + j)] += at(o.a, r * K + i) * at(o.b, (G * K + i) * N + j);
              break;
            case GemmForm::kGradInput:  // c[r, i] += a[r, j] * b[g, i, j]
              c[size_t(r * K + i)] += at(o.a, r * N + j) * at(o.b, (G * K + i) * N + j);
              break;
            case GemmForm::kGradWeight:  // c[g, i, j] += a[r, i] * b[r, j]
              c[size_t((G * K + i) * N + j)] += at(o.a, r * K + i) * at(o.b, r * N + j);
              break;
          }
        }
      }
    }
    row += gc.group_rows[g];
  }
  return c;
}

TEST_P(GroupedGemmExact, SmallIntegerProductsAreExact) {
  const GroupedGemmKernel kernel = GetParam();
  const GroupedCase cases[] = {{{0, 1, 5, 17, 129}, 7, 9}, {{129, 0, 5}, 300, 3}};
  Rng rng(31);
  int tested = 0;
  for (DType input : testing::kHarnessDtypes) {
    if (!kernel_serves(kernel, input)) continue;
    SKIP_UNLESS_AVAILABLE(kernel, input);
    const DType output = input == DType::F64 ? DType::F64 : DType::F32;
    for (const GroupedCase& gc : cases) {
      int64_t rows = 0;
      for (int64_t r : gc.group_rows) rows += r;
      const int64_t groups = int64_t(gc.group_rows.size());
      for (GemmForm form : {GemmForm::kForward, GemmForm::kGradInput, GemmForm::kGradWeight}) {
        for (bool accumulate : {false, true}) {
          Operands o;
          const int64_t a_cols = form == GemmForm::kGradInput ? gc.n : gc.k;
          o.a = small_integers({rows, a_cols}, input, rng);
          o.b = form == GemmForm::kGradWeight ? small_integers({rows, gc.n}, input, rng)
                                              : small_integers({groups, gc.k, gc.n}, input, rng);
          const Shape c_shape = form == GemmForm::kForward     ? Shape{rows, gc.n}
                                : form == GemmForm::kGradInput ? Shape{rows, gc.k}
                                                               : Shape{groups, gc.k, gc.n};
          o.c = small_integers(c_shape, output, rng);
          const std::vector<int64_t> expected = integer_product(form, gc, o, accumulate);
          grouped_gemm(args_for(form, gc, o, accumulate), kernel);
          ++tested;
          for (int64_t i = 0; i < o.c.numel(); ++i) {
            ASSERT_EQ(testing::value_at(o.c, i), double(expected[size_t(i)]))
                << gemm_form_name(form) << " " << dtype_name(input)
                << (accumulate ? " accumulate" : " overwrite") << " on groups of "
                << shape_string(gc.group_rows) << ", K=" << gc.k << ", N=" << gc.n << ", element "
                << i;
          }
        }
      }
    }
  }
  EXPECT_GT(tested, 0);
}

INSTANTIATE_TEST_SUITE_P(AllKernels, GroupedGemmExact, ::testing::ValuesIn(kAllKernels),
                         [](const ::testing::TestParamInfo<GroupedGemmKernel>& info) {
                           return std::string(grouped_gemm_kernel_name(info.param));
                         });

// Each output element is one fp32 FMA chain in depth order in every packed kernel, whatever its
// vector width or tile shape, so a CPU with AVX-512 gives bitwise the results of one without.
TEST(GroupedGemmDeterminism, PackedKernelsAgreeBitwise) {
  if (!grouped_gemm_kernel_available(GroupedGemmKernel::kPackedAvx512, DType::F32)) {
    GTEST_SKIP() << "no AVX-512F on this CPU";
  }
  for (const GroupedCase& gc : kGroupedCases) {
    for (GemmForm form : {GemmForm::kForward, GemmForm::kGradInput, GemmForm::kGradWeight}) {
      for (DType dtype : {DType::F32, DType::BF16, DType::F16}) {
        Operands avx2 = make_operands(form, gc, dtype, DType::F32, true, 9);
        Operands avx512 = make_operands(form, gc, dtype, DType::F32, true, 9);
        grouped_gemm(args_for(form, gc, avx2, true), GroupedGemmKernel::kPackedAvx2);
        grouped_gemm(args_for(form, gc, avx512, true), GroupedGemmKernel::kPackedAvx512);
        EXPECT_TRUE(testing::same_bytes(avx2.c, avx512.c))
            << gemm_form_name(form) << " " << dtype_name(dtype) << " on groups of "
            << shape_string(gc.group_rows) << ", K=" << gc.k << ", N=" << gc.n;
      }
    }
  }
}

TEST(GroupedGemmKernels, AutoRunsTheFastestAvailable) {
  EXPECT_EQ(grouped_gemm_auto_kernel(DType::F64), GroupedGemmKernel::kPerGroupBlas);
  for (DType dtype : {DType::F32, DType::BF16, DType::F16}) {
    GroupedGemmKernel chosen = grouped_gemm_auto_kernel(dtype);
    EXPECT_TRUE(grouped_gemm_kernel_available(chosen, dtype)) << dtype_name(dtype);
    if (grouped_gemm_kernel_available(GroupedGemmKernel::kPackedAvx2, dtype)) {
      EXPECT_NE(chosen, GroupedGemmKernel::kPerGroupBlas) << dtype_name(dtype);
    }
    if (grouped_gemm_kernel_available(GroupedGemmKernel::kPackedAvx512, dtype) &&
        dtype != DType::BF16) {
      EXPECT_EQ(chosen, GroupedGemmKernel::kPackedAvx512) << dtype_name(dtype);
    }
  }
  if (grouped_gemm_kernel_available(GroupedGemmKernel::kPackedAvx512Bf16, DType::BF16)) {
    EXPECT_EQ(grouped_gemm_auto_kernel(DType::BF16), GroupedGemmKernel::kPackedAvx512Bf16);
  }
}

TEST(LinearProducts, AreOneGroupOfTheGroupedForms) {
  Tensor x = random_normal({5, 3}, 1), w = random_normal({3, 4}, 2), dy = random_normal({5, 4}, 3);
  Tensor y({5, 4}), dx({5, 3}), dw = random_normal({3, 4}, 4);
  Tensor dw_start = dw.clone();
  linear_forward(x, w, y);
  linear_grad_input(dy, w, dx);
  linear_grad_weight(x, dy, dw);  // accumulates by default
  Tensor y_ref({5, 4}), dx_ref({5, 3}), dw_ref = dw_start.clone();
  sgemm_reference(false, false, 5, 4, 3, 1.0f, x.data<float>(), 3, w.data<float>(), 4, 0.0f,
                  y_ref.data<float>(), 4);
  sgemm_reference(false, true, 5, 3, 4, 1.0f, dy.data<float>(), 4, w.data<float>(), 4, 0.0f,
                  dx_ref.data<float>(), 3);
  sgemm_reference(true, false, 3, 4, 5, 1.0f, x.data<float>(), 3, dy.data<float>(), 4, 1.0f,
                  dw_ref.data<float>(), 4);
  EXPECT_TENSORS_CLOSE(y, y_ref, 1e-5, 1e-5);
  EXPECT_TENSORS_CLOSE(dx, dx_ref, 1e-5, 1e-5);
  EXPECT_TENSORS_CLOSE(dw, dw_ref, 1e-5, 1e-5);
}

TEST(GroupedGemmFlops, CountsTwoFlopsPerMultiplyAdd) {
  int64_t rows[] = {3, 0, 5};
  EXPECT_EQ(grouped_gemm_flops(rows, 7, 11), 2.0 * 8 * 7 * 11);
}

// ---- Bad inputs ----

TEST(GroupedGemmErrors, MessagesNameEveryOperandShape) {
  std::vector<int64_t> rows = {4, 6};
  Tensor x({10, 8}), w({2, 7, 5}), y({10, 5});
  EXPECT_EQ(error_text([&] { grouped_gemm(GemmForm::kForward, x, w, rows, y, false); }),
            "grouped_gemm(forward): inner dimensions differ (8 vs 7): x [10, 8], w [2, 7, 5], "
            "y [10, 5]");
  Tensor w_ok({2, 8, 5}), y_bad({10, 4});
  EXPECT_EQ(error_text([&] { grouped_gemm(GemmForm::kForward, x, w_ok, rows, y_bad, false); }),
            "grouped_gemm(forward): y should have shape [10, 5]: x [10, 8], w [2, 8, 5], "
            "y [10, 4]");
  std::vector<int64_t> short_rows = {4, 5};
  EXPECT_EQ(error_text([&] { grouped_gemm(GemmForm::kForward, x, w_ok, short_rows, y, false); }),
            "grouped_gemm(forward): group rows sum to 9 but x [10, 8], w [2, 8, 5], y [10, 5]");
  std::vector<int64_t> three_groups = {4, 6, 0};
  EXPECT_EQ(error_text([&] { grouped_gemm(GemmForm::kForward, x, w_ok, three_groups, y, false); }),
            "grouped_gemm(forward): 3 group sizes given but x [10, 8], w [2, 8, 5], y [10, 5]");
  std::vector<int64_t> negative = {13, -3};
  EXPECT_EQ(error_text([&] { grouped_gemm(GemmForm::kForward, x, w_ok, negative, y, false); }),
            "grouped_gemm(forward): group 1 has negative row count -3");
  Tensor dy({10, 5}), dx({10, 7});
  EXPECT_EQ(error_text([&] { grouped_gemm(GemmForm::kGradInput, dy, w_ok, rows, dx, false); }),
            "grouped_gemm(grad_input): grad_input should have shape [10, 8]: grad_output [10, 5], "
            "w [2, 8, 5], grad_input [10, 7]");
  Tensor dy_short({9, 5}), dw({2, 8, 5});
  EXPECT_EQ(error_text([&] { grouped_gemm(GemmForm::kGradWeight, x, dy_short, rows, dw, true); }),
            "grouped_gemm(grad_weight): group rows sum to 10 but x [10, 8], grad_output [9, 5], "
            "grad_weight [2, 8, 5]");
  Tensor w16({2, 8, 5}, DType::F16);
  EXPECT_EQ(error_text([&] { grouped_gemm(GemmForm::kForward, x, w16, rows, y, false); }),
            "grouped_gemm(forward): operands have different dtypes, x fp32 and w fp16");
  Tensor xb({10, 8}, DType::BF16), wb({2, 8, 5}, DType::BF16), y16({10, 5}, DType::F16);
  EXPECT_EQ(error_text([&] { grouped_gemm(GemmForm::kForward, xb, wb, rows, y16, false); }),
            "grouped_gemm: output dtype fp16 is not allowed with input dtype bf16");
  Tensor xi({10, 8}, DType::I32), wi({2, 8, 5}, DType::I32), yi({10, 5}, DType::I32);
  EXPECT_EQ(error_text([&] { grouped_gemm(GemmForm::kForward, xi, wi, rows, yi, false); }),
            "grouped_gemm: unsupported input dtype int32");
}

TEST(GroupedGemmErrors, UnavailableKernelIsNamed) {
  std::vector<int64_t> rows = {2};
  std::vector<double> a(6), b(9), c(6);
  GroupedGemmArgs args;
  args.groups = 1;
  args.group_rows = rows.data();
  args.k = 3;
  args.n = 3;
  args.input_dtype = args.output_dtype = DType::F64;
  args.a = a.data();
  args.b = b.data();
  args.c = c.data();
  EXPECT_EQ(error_text([&] { grouped_gemm(args, GroupedGemmKernel::kPackedAvx2); }),
            "grouped_gemm: kernel packed_avx2 is not available for input dtype fp64 on this CPU");
  // The bf16 dot-product kernel takes bf16 inputs only, whatever the CPU.
  std::vector<float> a32(6), b32(9), c32(6);
  args.input_dtype = args.output_dtype = DType::F32;
  args.a = a32.data();
  args.b = b32.data();
  args.c = c32.data();
  EXPECT_EQ(error_text([&] { grouped_gemm(args, GroupedGemmKernel::kPackedAvx512Bf16); }),
            "grouped_gemm: kernel packed_avx512_bf16 is not available for input dtype fp32 on this "
            "CPU");
}

TEST(SgemmErrors, ShortLeadingDimensionIsReported) {
  std::vector<float> a(20), b(20), c(20);
  EXPECT_EQ(error_text([&] {
              sgemm(false, false, 4, 5, 3, 1.0f, a.data(), 2, b.data(), 5, 0.0f, c.data(), 5);
            }),
            "sgemm: leading dimensions lda=2 ldb=5 ldc=5 are shorter than the rows of a (3), b "
            "(5) and c (5)");
}

// CBLAS takes int sizes: a size or leading dimension past INT_MAX is refused, named, before any
// memory is touched (the null operands are never read), instead of wrapping to a negative int.
TEST(SgemmErrors, SizesPastIntAreRefusedBeforeNarrowing) {
  const int64_t past_int = int64_t(std::numeric_limits<int>::max()) + 1;
  EXPECT_EQ(error_text([&] {
              sgemm(false, false, past_int, 1, 1, 1.0f, nullptr, 1, nullptr, 1, 0.0f, nullptr, 1);
            }),
            "gemm: BLAS sizes must fit in int (2147483647): m=2147483648 n=1 k=1 lda=1 ldb=1 "
            "ldc=1");
  EXPECT_EQ(error_text([&] {
              sgemm(true, false, 1, 1, 1, 1.0f, nullptr, past_int, nullptr, 1, 0.0f, nullptr, 1);
            }),
            "gemm: BLAS sizes must fit in int (2147483647): m=1 n=1 k=1 lda=2147483648 ldb=1 "
            "ldc=1");
  EXPECT_CONTAINS(error_text([&] {
                    sgemm(false, true, 1, 1, past_int, 1.0f, nullptr, past_int, nullptr, past_int,
                          0.0f, nullptr, 1);
                  }),
                  "k=2147483648 lda=2147483648 ldb=2147483648");
}

}  // namespace
}  // namespace moe
