// Packed AVX2/FMA grouped GEMM (fp32, bf16 and fp16 inputs, fp32 accumulation).
//
// Every group's product is C[m, n] (+)= op(A)[m, depth] op(B)[depth, n] (see GroupProduct). The
// work is cut into tiles (group, up to kMaxTileRows rows, a column range) that threads take from
// one shared list, so a group with few rows still spreads over every core. Inside a tile, for each
// depth chunk of kDepthChunk: the tile's A rows are packed once into 6-row panels (they stay in
// L2 while every column panel passes over them), and each 16-column B panel is packed just before
// use into a buffer that stays in L1 while every A panel passes over it. Packing converts
// bf16/fp16 to fp32, so one fp32 6x16 register-tile micro-kernel serves every dtype and form.
//
// Determinism: each output element is computed by one thread, from depth chunks that always start
// at multiples of kDepthChunk, each accumulated in depth order by the same instruction sequence.
// The tiling (which may depend on the thread count) therefore never changes a result bit.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <type_traits>
#include <vector>

#include "tensor/grouped_gemm_internal.h"

namespace moe {

bool packed_gemm_supported() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                __builtin_cpu_supports("f16c");
  return supported;
}

// Everything below uses AVX2/FMA/F16C instructions and runs only after packed_gemm_supported().
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace {

constexpr int64_t kPanelRows = 6;      // MR: rows of the register tile
constexpr int64_t kPanelCols = 16;     // NR: columns of the register tile (two 8-float vectors)
constexpr int64_t kDepthChunk = 256;   // KC: a 16-column B panel of this depth is 16 KiB (L1)
constexpr int64_t kMaxTileRows = 528;  // A block of kMaxTileRows x kDepthChunk fp32: 528 KiB (L2)
constexpr int64_t kMaxTileCols = 2048;
constexpr int64_t kMinTileCols = 128;

// ---- loads of 8 (or 1) elements of any input dtype as fp32 ----

inline __m256 load8(const float* p) {
  return _mm256_loadu_ps(p);
}
inline __m256 load8(const bf16* p) {
  __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline __m256 load8(const f16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline float load1(float v) {
  return v;
}
inline float load1(bf16 v) {
  return bf16_to_float(v);
}
inline float load1(f16 v) {
  return _cvtsh_ss(v.bits);
}

// A row-major matrix, possibly read transposed: element(i, p) of op(M).
template <class T>
struct Operand {
  const T* data;
  int64_t ld;
  bool transposed;
  const T* at(int64_t i, int64_t p) const {
    return transposed ? data + p * ld + i : data + i * ld + p;
  }
};

// Packs rows [i0, i0 + rows) x depth [p0, p0 + depth) of op(A) into 6-row panels: panel q holds,
// for each p, the 6 values of rows i0 + 6q .. i0 + 6q + 5 (zeros past `rows`).
template <class T>
void pack_a(const Operand<T>& a, int64_t i0, int64_t rows, int64_t p0, int64_t depth, float* out) {
  for (int64_t q = 0; q < rows; q += kPanelRows) {
    int64_t valid = std::min(kPanelRows, rows - q);
    for (int64_t p = 0; p < depth; ++p) {
      for (int64_t r = 0; r < valid; ++r) out[r] = load1(*a.at(i0 + q + r, p0 + p));
      for (int64_t r = valid; r < kPanelRows; ++r) out[r] = 0.0f;
      out += kPanelRows;
    }
  }
}

// In-register transpose of 8 rows of 8 floats.
inline void transpose8x8(__m256 v[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    s[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
    v[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
  }
}

// Packs depth [p0, p0 + depth) x columns [j0, j0 + cols) of op(B), cols <= 16, into one panel:
// for each p, 16 values (zeros past `cols`).
template <class T>
void pack_b_panel(const Operand<T>& b, int64_t p0, int64_t depth, int64_t j0, int64_t cols,
                  float* out) {
  int64_t p = 0;
  if (cols == kPanelCols && !b.transposed) {  // each row of the panel is contiguous
    for (; p < depth; ++p) {
      const T* row = b.at(p0 + p, j0);
      _mm256_store_ps(out + p * kPanelCols, load8(row));
      _mm256_store_ps(out + p * kPanelCols + 8, load8(row + 8));
    }
  } else if (cols == kPanelCols) {  // 16 source rows, contiguous in p: 8x8 transposes
    for (; p + 8 <= depth; p += 8) {
      for (int64_t half = 0; half < 2; ++half) {
        __m256 v[8];
        for (int r = 0; r < 8; ++r) v[r] = load8(b.at(p0 + p, j0 + 8 * half + r));
        transpose8x8(v);
        for (int r = 0; r < 8; ++r) _mm256_store_ps(out + (p + r) * kPanelCols + 8 * half, v[r]);
      }
    }
  }
  for (; p < depth; ++p) {  // remainder path: partial panels and the last depth steps
    for (int64_t c = 0; c < cols; ++c) out[p * kPanelCols + c] = load1(*b.at(p0 + p, j0 + c));
    for (int64_t c = cols; c < kPanelCols; ++c) out[p * kPanelCols + c] = 0.0f;
  }
}

// Asks for the source lines of a B panel ahead of packing it, so the loads overlap compute.
template <class T>
void prefetch_b_panel(const Operand<T>& b, int64_t p0, int64_t depth, int64_t j0) {
  if (!b.transposed) {
    for (int64_t p = 0; p < depth; ++p) _mm_prefetch(b.at(p0 + p, j0), _MM_HINT_T0);
  } else {
    constexpr int64_t kLine = 64 / sizeof(T);
    for (int64_t c = 0; c < kPanelCols; ++c)
      for (int64_t p = 0; p < depth; p += kLine) _mm_prefetch(b.at(p0 + p, j0 + c), _MM_HINT_T0);
  }
}

// C[6, 16] = (kLoadC ? C : 0) + A_panel * B_panel over `depth`, accumulated in depth order. The
// twelve accumulators are named variables: an array of them ends up spilled to the stack.
template <bool kLoadC>
void micro_kernel(int64_t depth, const float* a, const float* b, float* c, int64_t ldc) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if constexpr (kLoadC) {
    c00 = _mm256_loadu_ps(c), c01 = _mm256_loadu_ps(c + 8);
    c10 = _mm256_loadu_ps(c + ldc), c11 = _mm256_loadu_ps(c + ldc + 8);
    c20 = _mm256_loadu_ps(c + 2 * ldc), c21 = _mm256_loadu_ps(c + 2 * ldc + 8);
    c30 = _mm256_loadu_ps(c + 3 * ldc), c31 = _mm256_loadu_ps(c + 3 * ldc + 8);
    c40 = _mm256_loadu_ps(c + 4 * ldc), c41 = _mm256_loadu_ps(c + 4 * ldc + 8);
    c50 = _mm256_loadu_ps(c + 5 * ldc), c51 = _mm256_loadu_ps(c + 5 * ldc + 8);
  } else {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
  }
#pragma GCC unroll 4
  for (int64_t p = 0; p < depth; ++p) {
    __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
    __m256 a0 = _mm256_broadcast_ss(a), a1 = _mm256_broadcast_ss(a + 1);
    c00 = _mm256_fmadd_ps(a0, b0, c00), c01 = _mm256_fmadd_ps(a0, b1, c01);
    c10 = _mm256_fmadd_ps(a1, b0, c10), c11 = _mm256_fmadd_ps(a1, b1, c11);
    a0 = _mm256_broadcast_ss(a + 2), a1 = _mm256_broadcast_ss(a + 3);
    c20 = _mm256_fmadd_ps(a0, b0, c20), c21 = _mm256_fmadd_ps(a0, b1, c21);
    c30 = _mm256_fmadd_ps(a1, b0, c30), c31 = _mm256_fmadd_ps(a1, b1, c31);
    a0 = _mm256_broadcast_ss(a + 4), a1 = _mm256_broadcast_ss(a + 5);
    c40 = _mm256_fmadd_ps(a0, b0, c40), c41 = _mm256_fmadd_ps(a0, b1, c41);
    c50 = _mm256_fmadd_ps(a1, b0, c50), c51 = _mm256_fmadd_ps(a1, b1, c51);
    a += kPanelRows;
    b += kPanelCols;
  }
  _mm256_storeu_ps(c, c00), _mm256_storeu_ps(c + 8, c01);
  _mm256_storeu_ps(c + ldc, c10), _mm256_storeu_ps(c + ldc + 8, c11);
  _mm256_storeu_ps(c + 2 * ldc, c20), _mm256_storeu_ps(c + 2 * ldc + 8, c21);
  _mm256_storeu_ps(c + 3 * ldc, c30), _mm256_storeu_ps(c + 3 * ldc + 8, c31);
  _mm256_storeu_ps(c + 4 * ldc, c40), _mm256_storeu_ps(c + 4 * ldc + 8, c41);
  _mm256_storeu_ps(c + 5 * ldc, c50), _mm256_storeu_ps(c + 5 * ldc + 8, c51);
}

// The micro-kernel on a tile that may be cut by the matrix edge: runs it on a full 6x16 copy.
void edge_kernel(int64_t depth, const float* a, const float* b, float* c, int64_t ldc, int64_t rows,
                 int64_t cols, bool load_c) {
  alignas(32) float tile[kPanelRows * kPanelCols] = {};
  if (load_c) {
    for (int64_t r = 0; r < rows; ++r) std::copy_n(c + r * ldc, cols, tile + r * kPanelCols);
    micro_kernel<true>(depth, a, b, tile, kPanelCols);
  } else {
    micro_kernel<false>(depth, a, b, tile, kPanelCols);
  }
  for (int64_t r = 0; r < rows; ++r) std::copy_n(tile + r * kPanelCols, cols, c + r * ldc);
}

struct Tile {
  int64_t group, row0, rows, col0, cols;
  double work;
};

// Cuts every group's product into tiles: rows evenly into blocks of at most kMaxTileRows, columns
// into as many ranges as it takes for about 4 tiles per thread (for load balance), largest first.
std::vector<Tile> plan_tiles(const GroupedGemmArgs& args, const GroupedGemmLayout& layout,
                             int threads) {
  int64_t row_tiles = 0, widest = 0;
  for (int64_t g = 0; g < args.groups; ++g) {
    GroupProduct p = layout.product(args, g);
    if (p.m > 0 && p.n > 0) row_tiles += (p.m + kMaxTileRows - 1) / kMaxTileRows;
    widest = std::max(widest, p.n);
  }
  int64_t wanted = 4 * int64_t(threads);
  int64_t column_splits = row_tiles ? (wanted + row_tiles - 1) / row_tiles : 1;
  int64_t tile_cols = (widest + column_splits - 1) / column_splits;
  tile_cols = std::clamp((tile_cols + kPanelCols - 1) / kPanelCols * kPanelCols, kMinTileCols,
                         kMaxTileCols);
  std::vector<Tile> tiles;
  for (int64_t g = 0; g < args.groups; ++g) {
    GroupProduct p = layout.product(args, g);
    if (p.m == 0 || p.n == 0) continue;
    int64_t blocks = (p.m + kMaxTileRows - 1) / kMaxTileRows;
    int64_t rows = (p.m + blocks - 1) / blocks;
    rows = (rows + kPanelRows - 1) / kPanelRows * kPanelRows;
    for (int64_t row0 = 0; row0 < p.m; row0 += rows) {
      for (int64_t col0 = 0; col0 < p.n; col0 += tile_cols) {
        Tile t{g, row0, std::min(rows, p.m - row0), col0, std::min(tile_cols, p.n - col0), 0};
        t.work = double(t.rows) * double(t.cols) * double(std::max<int64_t>(p.k, 1));
        tiles.push_back(t);
      }
    }
  }
  std::stable_sort(tiles.begin(), tiles.end(),
                   [](const Tile& x, const Tile& y) { return x.work > y.work; });
  return tiles;
}

// 64-byte aligned fp32 scratch that grows on demand and lives as long as its thread.
struct Scratch {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> memory;
  size_t capacity = 0;
  float* get(size_t count) {
    if (count > capacity) {
      size_t bytes = (count * sizeof(float) + 63) / 64 * 64;
      memory.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
      MOE_CHECK(memory != nullptr, "grouped_gemm: out of memory for ", bytes, " bytes of scratch");
      capacity = count;
    }
    return memory.get();
  }
};

struct ThreadScratch {
  Scratch a_block, b_panel, c_tile;
};
thread_local ThreadScratch scratch;

// One tile: C_tile (+)= op(A)[tile rows, :] op(B)[:, tile cols]. `c` points at the tile's first
// element with row stride ldc, in fp32 (the caller provides a converted copy for half outputs).
template <class T>
void run_tile(const Operand<T>& a, const Operand<T>& b, int64_t depth, const Tile& t, float* c,
              int64_t ldc, bool accumulate) {
  if (depth == 0) {
    if (!accumulate)
      for (int64_t r = 0; r < t.rows; ++r) std::fill_n(c + r * ldc, t.cols, 0.0f);
    return;
  }
  int64_t padded_rows = (t.rows + kPanelRows - 1) / kPanelRows * kPanelRows;
  float* a_block = scratch.a_block.get(size_t(padded_rows * kDepthChunk));
  float* b_panel = scratch.b_panel.get(size_t(kDepthChunk * kPanelCols));
  for (int64_t p0 = 0; p0 < depth; p0 += kDepthChunk) {
    int64_t chunk = std::min(kDepthChunk, depth - p0);
    bool load_c = accumulate || p0 > 0;
    pack_a(a, t.row0, t.rows, p0, chunk, a_block);
    for (int64_t j = 0; j < t.cols; j += kPanelCols) {
      int64_t cols = std::min(kPanelCols, t.cols - j);
      pack_b_panel(b, p0, chunk, t.col0 + j, cols, b_panel);
      if (j + 2 * kPanelCols <= t.cols) prefetch_b_panel(b, p0, chunk, t.col0 + j + kPanelCols);
      for (int64_t i = 0; i < t.rows; i += kPanelRows) {
        const float* a_panel = a_block + i * chunk;
        float* c_ij = c + i * ldc + j;
        int64_t rows = std::min(kPanelRows, t.rows - i);
        if (rows == kPanelRows && cols == kPanelCols) {
          if (load_c) {
            micro_kernel<true>(chunk, a_panel, b_panel, c_ij, ldc);
          } else {
            micro_kernel<false>(chunk, a_panel, b_panel, c_ij, ldc);
          }
        } else {
          edge_kernel(chunk, a_panel, b_panel, c_ij, ldc, rows, cols, load_c);
        }
      }
    }
  }
}

// Converts between the half output and the fp32 tile copy the kernel accumulates in.
template <class Out>
void tile_to_float(const Out* c, int64_t ldc, const Tile& t, float* out) {
  for (int64_t r = 0; r < t.rows; ++r)
    convert_to_float(c + r * ldc, out + r * t.cols, size_t(t.cols));
}
template <class Out>
void tile_from_float(const float* in, const Tile& t, Out* c, int64_t ldc) {
  for (int64_t r = 0; r < t.rows; ++r)
    convert_from_float(in + r * t.cols, c + r * ldc, size_t(t.cols));
}

template <class T>
void run_all_tiles(const GroupedGemmArgs& args, const GroupedGemmLayout& layout) {
  int threads = omp_in_parallel() ? 1 : omp_get_max_threads();
  std::vector<Tile> tiles = plan_tiles(args, layout, threads);
  double total_work = 0;
  for (const Tile& t : tiles) total_work += t.work;
  bool fp32_out = args.output_dtype == DType::F32;
  // Small products are not worth waking threads for.
#pragma omp parallel for schedule(dynamic, 1) if (tiles.size() > 1 && total_work > 2e6)
  for (size_t index = 0; index < tiles.size(); ++index) {
    const Tile& t = tiles[index];
    GroupProduct p = layout.product(args, t.group);
    Operand<T> a{static_cast<const T*>(args.a) + p.a_offset, p.lda, p.transpose_a};
    Operand<T> b{static_cast<const T*>(args.b) + p.b_offset, p.ldb, p.transpose_b};
    // Move the operands to the tile's corner: A rows start at row0, B columns at col0.
    a.data = a.at(t.row0, 0);
    b.data = b.at(0, t.col0);
    Tile local = t;
    local.row0 = 0;
    local.col0 = 0;
    int64_t c_offset = p.c_offset + t.row0 * p.ldc + t.col0;
    if (fp32_out) {
      run_tile(a, b, p.k, local, static_cast<float*>(args.c) + c_offset, p.ldc, args.accumulate);
      continue;
    }
    if constexpr (!std::is_same_v<T, float>) {  // half output: accumulate in an fp32 copy
      T* c = static_cast<T*>(args.c) + c_offset;
      float* c_tile = scratch.c_tile.get(size_t(t.rows * t.cols));
      if (args.accumulate) tile_to_float(c, p.ldc, t, c_tile);
      run_tile(a, b, p.k, local, c_tile, t.cols, args.accumulate);
      tile_from_float(c_tile, t, c, p.ldc);
    }
  }
}

}  // namespace

void grouped_gemm_packed(const GroupedGemmArgs& args, const GroupedGemmLayout& layout) {
  switch (args.input_dtype) {
    case DType::F32:
      return run_all_tiles<float>(args, layout);
    case DType::BF16:
      return run_all_tiles<bf16>(args, layout);
    case DType::F16:
      return run_all_tiles<f16>(args, layout);
    default:
      throw Error(detail::concat("grouped_gemm: the packed kernel has no ",
                                 dtype_name(args.input_dtype), " path"));
  }
}

#pragma GCC pop_options

}  // namespace moe
