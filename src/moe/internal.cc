#include "moe/internal.h"

#include <algorithm>

#include "tensor/dtype_switch.h"

namespace moe::internal {

void accumulate_into(const Tensor& src, Tensor& dst) {
  MOE_CHECK(src.numel() == dst.numel(), "accumulate_into: source ", shape_string(src.shape()),
            " and target ", shape_string(dst.shape()), " differ in size");
  dispatch_floating(src.dtype(), "accumulate_into source", [&](auto src_tag) {
    dispatch_floating(dst.dtype(), "accumulate_into target", [&](auto dst_tag) {
      using S = decltype(src_tag);
      using D = decltype(dst_tag);
      using M =
          std::conditional_t<std::is_same_v<S, double> || std::is_same_v<D, double>, double, float>;
      const S* in = src.data<S>();
      D* out = dst.data<D>();
      int64_t count = src.numel();
#pragma omp parallel for schedule(static) if (count > 65536)
      for (int64_t i = 0; i < count; ++i) {
        M sum = M(load(out[i])) + M(load(in[i]));
        if constexpr (std::is_same_v<D, double>) {
          out[i] = sum;
        } else {
          out[i] = store<D>(float(sum));
        }
      }
    });
  });
}

void add_column_sums(const Tensor& x, int64_t begin, int64_t end, Tensor& dst, int64_t dst_row) {
  int64_t n = x.dim(-1);
  MOE_CHECK(dst.dim(-1) == n, "add_column_sums: widths differ, ", n, " vs ", dst.dim(-1));
  dispatch_floating(x.dtype(), "add_column_sums", [&](auto tag) {
    using T = decltype(tag);
    with_compute_type(dst.dtype(), [&](auto acc_tag) {
      using A = decltype(acc_tag);
      const T* in = x.data<T>();
      A* out = dst.data<A>() + dst_row * n;
      // Column blocks in parallel, rows in order inside each: the same sums whatever the
      // thread count, with contiguous reads.
      constexpr int64_t kBlock = 256;
      int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if ((end - begin) * n > 65536)
      for (int64_t block = 0; block < blocks; ++block) {
        int64_t c0 = block * kBlock, c1 = std::min(n, c0 + kBlock);
        A totals[kBlock] = {};
        for (int64_t r = begin; r < end; ++r) {
          for (int64_t c = c0; c < c1; ++c) totals[c - c0] += A(load(in[r * n + c]));
        }
        for (int64_t c = c0; c < c1; ++c) out[c] += totals[c - c0];
      }
    });
  });
}

}  // namespace moe::internal
