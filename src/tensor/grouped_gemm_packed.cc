// Packed grouped GEMM (fp32, bf16 and fp16 inputs, fp32 accumulation) with three register-tile
// micro-kernels: AVX2/FMA (6 rows x 16 columns), AVX-512 (8 x 32: twice the FMA width, about twice
// the rate on CPUs with full-width AVX-512 units) and, for bf16 inputs, AVX512-BF16 (8 x 32 with
// dot products of bf16 pairs: twice the AVX-512 rate again).
//
// Every group's product is C[m, n] (+)= op(A)[m, depth] op(B)[depth, n] (see GroupProduct). The
// work is cut into tiles (group, up to kMaxTileRows rows, a column range) that threads take from
// one shared list, so a group with few rows still spreads over every core. A tile's A rows are
// packed once per depth chunk (KC) into row panels; B is packed block by block (KC deep,
// kBlockCols wide) into column panels (L2) that every A panel passes over, while the next block's
// source lines and the next kernel calls' C lines are prefetched. Blocks run column block by
// column block when the tile's packed A fits kMaxResidentAWords, so each C block stays in L2 over
// the whole depth. Packing converts fp16 (and bf16 for the fp32 kernels) to fp32, or pairs bf16
// values for the dot-product kernel, so one micro-kernel per instruction set serves every form.
//
// Determinism: each output element is computed by one thread, depth chunk after depth chunk in
// order, each accumulated in depth order by the same instruction sequence (C is reloaded exactly
// between chunks). The tiling (which may depend on the thread count) therefore never changes a
// result bit, and the AVX2 and AVX-512 kernels (one fp32 FMA chain per element) agree bitwise.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "tensor/grouped_gemm_internal.h"

namespace moe {

bool packed_gemm_supported(GroupedGemmKernel kernel) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f");
  static const bool avx512_bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
  switch (kernel) {
    case GroupedGemmKernel::kPackedAvx2:
      return avx2;
    case GroupedGemmKernel::kPackedAvx512:
      return avx512;
    case GroupedGemmKernel::kPackedAvx512Bf16:
      return avx512_bf16;
    case GroupedGemmKernel::kAuto:
    case GroupedGemmKernel::kPerGroupBlas:
      return false;
  }
  return false;
}

// Everything below runs only after packed_gemm_supported(): the shared code (packing, tiling)
// uses AVX2/FMA/F16C; each micro-kernel is compiled for its own instruction set.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace {

// Each micro-kernel sets its depth chunk KC (Micro::kDepthChunk) so that one depth step of a
// panel row is one 32-bit word and a 32-column B panel is 32 KiB (L1).
constexpr int64_t kMaxTileRows = 528;  // an A block of 528 x KC words is 528 KiB (L2); 528 = 6 * 88
                                       // = 8 * 66, whole panels for every kernel
constexpr int64_t kBlockCols = 256;    // a B block of KC x 256 words is 256 KiB (L2)
constexpr int64_t kL1Bytes = 32 << 10;  // the L1 data cache the blocking plans for
// A tile's A stays packed for every depth chunk when it holds at most this many words (8 MiB: in
// L3), so that C blocks stay in L2 (see run_tile).
constexpr int64_t kMaxResidentAWords = int64_t(2) << 20;
// Tile widths: wide tiles pack each A block once for many columns; narrower ones (never below
// kMinTileCols) are cut only when there are too few row tiles to keep every thread busy.
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

// The transpose of op(M): its element (p, i) is op(M)'s (i, p). Packing A's row panels is packing
// B's column panels of this.
template <class T>
Operand<T> flipped(const Operand<T>& m) {
  return {m.data, m.ld, !m.transposed};
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

// Fills 8 depth steps x kPanelCols columns of a panel (`out`, row stride kPanelCols) from the
// columns' source rows: source_row(c) gives the 8 words of column c, an 8x8 transpose per 8
// columns. (Words are fp32 values or bf16 pairs; the transpose only moves them.)
template <int64_t kPanelCols, class SourceRow>
void transpose_into_panel(SourceRow source_row, float* out) {
  for (int64_t eighth = 0; eighth < kPanelCols; eighth += 8) {
    __m256 v[8];
    for (int r = 0; r < 8; ++r) v[r] = source_row(eighth + r);
    transpose8x8(v);
    for (int r = 0; r < 8; ++r) _mm256_store_ps(out + r * kPanelCols + eighth, v[r]);
  }
}

// Packs depth [p0, p0 + depth) x columns [j0, j0 + cols) of op(B) into panels of kPanelCols
// columns, panel q at out + q * depth * kPanelCols holding, for each p, kPanelCols values (zeros
// past `cols`). A's row panels are packed by this too, from flipped(A). The vector paths fill whole
// panels of whole 8-column groups; the rest (a partial last panel, or every panel when kPanelCols
// is not a multiple of 8, as the AVX2 kernel's 6-row A panels) is the element-by-element path.
template <int64_t kPanelCols, class T>
void pack_b(const Operand<T>& b, int64_t p0, int64_t depth, int64_t j0, int64_t cols, float* out) {
  const int64_t full_panels = kPanelCols % 8 == 0 ? cols / kPanelCols : 0;
  const int64_t panel_size = depth * kPanelCols;
  if (!b.transposed) {
    // Row by row, so the source streams through memory in order (reading a panel's rows would
    // jump by the row stride, and those lines collide in the same cache sets).
    for (int64_t p = 0; p < depth; ++p) {
      const T* row = b.at(p0 + p, j0);
      float* target = out + p * kPanelCols;
      for (int64_t q = 0; q < full_panels; ++q, row += kPanelCols, target += panel_size) {
        for (int64_t v = 0; v < kPanelCols; v += 8) _mm256_store_ps(target + v, load8(row + v));
      }
    }
  } else {
    // A panel reads kPanelCols source rows, each contiguous in p: 8x8 transposes.
    for (int64_t q = 0; q < full_panels; ++q) {
      float* panel = out + q * panel_size;
      int64_t p = 0;
      for (; p + 8 <= depth; p += 8) {
        transpose_into_panel<kPanelCols>(
            [&](int64_t c) { return load8(b.at(p0 + p, j0 + q * kPanelCols + c)); },
            panel + p * kPanelCols);
      }
      for (; p < depth; ++p) {
        for (int64_t c = 0; c < kPanelCols; ++c) {
          panel[p * kPanelCols + c] = load1(*b.at(p0 + p, j0 + q * kPanelCols + c));
        }
      }
    }
  }
  for (int64_t done = full_panels * kPanelCols; done < cols; done += kPanelCols) {
    float* panel = out + done * depth;
    int64_t valid = std::min(kPanelCols, cols - done);
    for (int64_t p = 0; p < depth; ++p) {
      for (int64_t c = 0; c < valid; ++c)
        panel[p * kPanelCols + c] = load1(*b.at(p0 + p, j0 + done + c));
      for (int64_t c = valid; c < kPanelCols; ++c) panel[p * kPanelCols + c] = 0.0f;
    }
  }
}

// ---- bf16 pairs for the AVX512-BF16 kernel: the values at depths p and p + 1 share one 32-bit
// word (p in the low half), the operand layout of the dot-product instruction; the last word of
// an odd depth has a zero high half ----

// Depth steps (panel words per row) of `depth` values, `per_step` values to a word.
constexpr int64_t steps_of(int64_t depth, int64_t per_step) {
  return (depth + per_step - 1) / per_step;
}

inline uint32_t pair_word(uint16_t low, uint16_t high) {
  return uint32_t(low) | uint32_t(high) << 16;
}

// The word of depths (p, p + 1) of row i of op(M); `depth_end` bounds p + 1.
inline uint32_t pair_at(const Operand<bf16>& m, int64_t i, int64_t p, int64_t depth_end) {
  return pair_word(m.at(i, p)->bits, p + 1 < depth_end ? m.at(i, p + 1)->bits : uint16_t(0));
}

// pack_b for pairs: panel q at out + q * steps * kPanelCols holds, for each depth step, the words
// of kPanelCols columns (zeros past `cols`); the same paths as pack_b.
template <int64_t kPanelCols>
void pack_b_pairs(const Operand<bf16>& b, int64_t p0, int64_t depth, int64_t j0, int64_t cols,
                  uint32_t* out) {
  const int64_t steps = steps_of(depth, 2), full_steps = depth / 2;
  const int64_t full_panels = kPanelCols % 8 == 0 ? cols / kPanelCols : 0;
  const int64_t panel_size = steps * kPanelCols;
  const Operand<bf16> columns = flipped(b);  // pair_at reads op(B)(p, j) as row j, depth p
  if (!b.transposed) {
    // Source rows p and p + 1, interleaved 16 bits at a time.
    for (int64_t s = 0; s < steps; ++s) {
      const bf16* low = b.at(p0 + 2 * s, j0);
      const bf16* high = s < full_steps ? b.at(p0 + 2 * s + 1, j0) : nullptr;
      uint32_t* target = out + s * kPanelCols;
      for (int64_t q = 0; q < full_panels; ++q, target += panel_size) {
        for (int64_t v = 0; v < kPanelCols; v += 8) {
          int64_t column = q * kPanelCols + v;
          __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(low + column));
          __m128i y = high ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(high + column))
                           : _mm_setzero_si128();
          _mm_store_si128(reinterpret_cast<__m128i*>(target + v), _mm_unpacklo_epi16(x, y));
          _mm_store_si128(reinterpret_cast<__m128i*>(target + v + 4), _mm_unpackhi_epi16(x, y));
        }
      }
    }
  } else {
    // Each source row (a column of op(B)) holds its words contiguously: 8x8 word transposes.
    for (int64_t q = 0; q < full_panels; ++q) {
      uint32_t* panel = out + q * panel_size;
      int64_t s = 0;
      for (; s + 8 <= full_steps; s += 8) {
        transpose_into_panel<kPanelCols>(
            [&](int64_t c) {  // 8 words (16 bf16) of source row c, as float lanes
              return _mm256_loadu_ps(
                  reinterpret_cast<const float*>(b.at(p0 + 2 * s, j0 + q * kPanelCols + c)));
            },
            reinterpret_cast<float*>(panel + s * kPanelCols));
      }
      for (; s < steps; ++s) {
        for (int64_t c = 0; c < kPanelCols; ++c) {
          panel[s * kPanelCols + c] =
              pair_at(columns, j0 + q * kPanelCols + c, p0 + 2 * s, p0 + depth);
        }
      }
    }
  }
  for (int64_t done = full_panels * kPanelCols; done < cols; done += kPanelCols) {
    uint32_t* panel = out + done * steps;
    int64_t valid = std::min(kPanelCols, cols - done);
    for (int64_t s = 0; s < steps; ++s) {
      for (int64_t c = 0; c < valid; ++c)
        panel[s * kPanelCols + c] = pair_at(columns, j0 + done + c, p0 + 2 * s, p0 + depth);
      for (int64_t c = valid; c < kPanelCols; ++c) panel[s * kPanelCols + c] = 0;
    }
  }
}

// The source memory that pack_b reads for one B block: `segments` runs of `length` contiguous
// elements, `stride` elements apart.
template <class T>
struct BlockSource {
  const T* first = nullptr;
  int64_t stride = 0, segments = 0, length = 0;
};

template <class T>
BlockSource<T> block_source(const Operand<T>& b, int64_t p0, int64_t depth, int64_t j0,
                            int64_t cols) {
  if (b.transposed) return {b.at(p0, j0), b.ld, cols, depth};
  return {b.at(p0, j0), b.ld, depth, cols};
}

// Cache lines in one segment of a block's source.
template <class T>
int64_t lines_per_segment(const BlockSource<T>& source) {
  return (source.length * int64_t(sizeof(T)) + 63) / 64;
}

// Requests lines [begin, end) of a block's source (numbered segment by segment), so that the
// weights of the next block stream in from memory while the current block computes.
template <class T>
void prefetch_lines(const BlockSource<T>& source, int64_t begin, int64_t end) {
  if (begin >= end) return;
  const int64_t per_segment = lines_per_segment(source);
  int64_t segment = begin / per_segment, line = begin % per_segment;
  const char* base = reinterpret_cast<const char*>(source.first + segment * source.stride);
  for (int64_t count = end - begin; count > 0; --count) {
    _mm_prefetch(base + line * 64, _MM_HINT_T0);
    if (++line == per_segment) {
      line = 0;
      base += source.stride * int64_t(sizeof(T));
    }
  }
}

// A micro-kernel for 1 .. kRows rows of C over `steps` depth steps of packed panels (see
// packed_micro_kernel.inc). A Micro type describes one: Packed (the panel word: float, or a bf16
// pair), kRows x kCols (register tile), kDepthPerStep, kDepthChunk and kKernels.
template <class Packed>
using MicroKernel = void (*)(int64_t steps, const Packed* a, const Packed* b, float* c, int64_t ldc,
                             bool load_c);

// The table of kernels for 1 .. kRows rows (entry 0 unused).
template <int kRows, template <int> class Kernel, class Packed>
constexpr std::array<MicroKernel<Packed>, kRows + 1> kernels_by_rows() {
  return []<int... R>(std::integer_sequence<int, R...>) {
    return std::array<MicroKernel<Packed>, kRows + 1>{nullptr, &Kernel<R + 1>::run...};
  }
  (std::make_integer_sequence<int, kRows>{});
}

// AVX2: 6 rows x 16 columns (two 8-float vectors), 12 accumulators.
namespace avx2 {
struct Simd {
  using V = __m256;
  static constexpr int64_t kLanes = 8;
  static constexpr int kTileRows = 6;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_load_ps(p); }
  static V loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
};
#include "tensor/packed_micro_kernel.inc"
}  // namespace avx2

#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")

// AVX-512: 8 rows x 32 columns (two 16-float vectors), 16 accumulators: each B vector load and
// A broadcast feeds more FMAs than in the AVX2 tile.
namespace avx512 {
struct Simd {
  using V = __m512;
  static constexpr int64_t kLanes = 16;
  static constexpr int kTileRows = 8;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_load_ps(p); }
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
};
#include "tensor/packed_micro_kernel.inc"
}  // namespace avx512

#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bf16,avx2,fma,f16c")

// AVX512-BF16: 8 rows x 32 columns like the AVX-512 tile, but each instruction multiplies bf16
// pairs and adds both products to the fp32 accumulator (two depths per FMA slot: twice the
// rate of widening to fp32). The products are exact; the hardware adds them in its own order,
// flushes subnormals and rounds to nearest even, so the bits differ from the fp32 kernels.
namespace avx512_bf16 {
template <int kRows>
struct RowKernel {
  template <bool kLoadC>
  static void body(int64_t steps, const uint32_t* a, const uint32_t* b, float* c, int64_t ldc) {
    [&]<int... R>(std::integer_sequence<int, R...>) {
      __m512 low[kRows], high[kRows];  // columns 0..15 and 16..31 of each row
      if constexpr (kLoadC) {
        ((low[R] = _mm512_loadu_ps(c + R * ldc), high[R] = _mm512_loadu_ps(c + R * ldc + 16)), ...);
      } else {
        ((low[R] = _mm512_setzero_ps(), high[R] = _mm512_setzero_ps()), ...);
      }
#pragma GCC unroll 4
      for (int64_t s = 0; s < steps; ++s) {
        __m512bh b0 = (__m512bh)_mm512_load_si512(b), b1 = (__m512bh)_mm512_load_si512(b + 16);
        ((low[R] = _mm512_dpbf16_ps(low[R], (__m512bh)_mm512_set1_epi32(int(a[R])), b0),
          high[R] = _mm512_dpbf16_ps(high[R], (__m512bh)_mm512_set1_epi32(int(a[R])), b1)),
         ...);
        a += 8;
        b += 32;
      }
      ((_mm512_storeu_ps(c + R * ldc, low[R]), _mm512_storeu_ps(c + R * ldc + 16, high[R])), ...);
    }
    (std::make_integer_sequence<int, kRows>{});
  }
  static void run(int64_t steps, const uint32_t* a, const uint32_t* b, float* c, int64_t ldc,
                  bool load_c) {
    load_c ? body<true>(steps, a, b, c, ldc) : body<false>(steps, a, b, c, ldc);
  }
};

struct Micro {
  using Packed = uint32_t;  // a bf16 pair
  static constexpr int64_t kRows = 8, kCols = 32, kDepthPerStep = 2, kDepthChunk = 512;
  static constexpr auto kKernels = kernels_by_rows<kRows, RowKernel, Packed>();
};
}  // namespace avx512_bf16

#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

// C[rows, cols] (rows <= kRows, cols <= kCols) from one A panel and one B panel. Full-width tiles
// run in place; a tile cut by the last column runs on a full-width copy (the remainder path).
template <class Micro, class Packed = typename Micro::Packed>
void run_kernel(int64_t steps, const Packed* a, const Packed* b, float* c, int64_t ldc,
                int64_t rows, int64_t cols, bool load_c) {
  constexpr int64_t kCols = Micro::kCols;
  if (cols == kCols) {
    Micro::kKernels[rows](steps, a, b, c, ldc, load_c);
    return;
  }
  alignas(64) float edge[Micro::kRows * kCols];
  if (load_c)
    for (int64_t r = 0; r < rows; ++r) std::copy_n(c + r * ldc, cols, edge + r * kCols);
  Micro::kKernels[rows](steps, a, b, edge, kCols, load_c);
  for (int64_t r = 0; r < rows; ++r) std::copy_n(edge + r * kCols, cols, c + r * ldc);
}

struct Tile {
  int64_t group, row0, rows, col0, cols;
  double work;
};

// Cuts every group's product into tiles: rows evenly into blocks of at most kMaxTileRows, columns
// into as many ranges as it takes for about 8 tiles per thread (for load balance), largest first.
template <class Micro>
std::vector<Tile> plan_tiles(const GroupedGemmArgs& args, const GroupedGemmLayout& layout,
                             int threads) {
  int64_t row_tiles = 0, widest = 0;
  for (int64_t g = 0; g < args.groups; ++g) {
    GroupProduct p = layout.product(args, g);
    if (p.m > 0 && p.n > 0) row_tiles += (p.m + kMaxTileRows - 1) / kMaxTileRows;
    widest = std::max(widest, p.n);
  }
  int64_t wanted = 8 * int64_t(threads);
  int64_t column_splits = row_tiles ? (wanted + row_tiles - 1) / row_tiles : 1;
  int64_t tile_cols = (widest + column_splits - 1) / column_splits;
  tile_cols = std::clamp((tile_cols + Micro::kCols - 1) / Micro::kCols * Micro::kCols, kMinTileCols,
                         kMaxTileCols);
  std::vector<Tile> tiles;
  for (int64_t g = 0; g < args.groups; ++g) {
    GroupProduct p = layout.product(args, g);
    if (p.m == 0 || p.n == 0) continue;
    int64_t blocks = (p.m + kMaxTileRows - 1) / kMaxTileRows;
    int64_t rows = (p.m + blocks - 1) / blocks;
    rows = (rows + Micro::kRows - 1) / Micro::kRows * Micro::kRows;
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

// 64-byte aligned scratch of 4-byte words (fp32 or bf16 pairs) that grows on demand and lives as
// long as its thread.
struct Scratch {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<void, Free> memory;
  size_t capacity = 0;  // bytes
  template <class Word>
  Word* get(size_t count) {
    static_assert(sizeof(Word) == 4);
    size_t bytes = (count * sizeof(Word) + 63) / 64 * 64;
    if (bytes > capacity) {
      void* grown = std::aligned_alloc(64, bytes);
      MOE_CHECK(grown != nullptr, "grouped_gemm: out of memory for ", bytes, " bytes of scratch");
      memory.reset(grown);
      capacity = bytes;
    }
    return static_cast<Word*>(memory.get());
  }
};

// Per thread at most: the packed A of a tile (8 MiB when it stays resident for every depth
// chunk, else 528 KiB), a B block (256 KiB) and, for half outputs, an fp32 copy of one tile (up
// to 528 x 2048 x 4 bytes); the sizes do not grow with the number of rows.
struct ThreadScratch {
  Scratch a_block, b_block, c_tile;
};
thread_local ThreadScratch scratch;

// The kernel calls over one B block (rows x cols of C, from the block's corner) in the order
// they run. Normally column panel by column panel, so each B panel stays in L1 while the A panels
// pass over it; when the whole B block fits in L1 anyway (a shallow depth chunk: grad_weight of a
// group with few rows), row panel by row panel, so C, the operand that streams from memory then,
// is read and written along its rows.
struct CallOrder {
  int64_t rows, cols, row_panels, col_panels;
  bool rows_outer;
  template <class Micro>
  static CallOrder of(int64_t rows, int64_t cols, int64_t steps) {
    int64_t row_panels = (rows + Micro::kRows - 1) / Micro::kRows;
    int64_t col_panels = (cols + Micro::kCols - 1) / Micro::kCols;
    bool block_in_l1 =
        steps * col_panels * Micro::kCols * int64_t(sizeof(typename Micro::Packed)) <= kL1Bytes;
    return {rows, cols, row_panels, col_panels, block_in_l1};
  }
  int64_t calls() const { return row_panels * col_panels; }
  // The (row panel, column panel) of call `call`.
  std::pair<int64_t, int64_t> panels(int64_t call) const {
    if (rows_outer) return {call / col_panels, call % col_panels};
    return {call % row_panels, call / row_panels};
  }
};

// pack_b or pack_b_pairs, whichever makes the panel words of Micro.
template <class Micro, int64_t kPanelCols, class T>
void pack_panels(const Operand<T>& m, int64_t p0, int64_t depth, int64_t j0, int64_t cols,
                 typename Micro::Packed* out) {
  if constexpr (Micro::kDepthPerStep == 2) {
    pack_b_pairs<kPanelCols>(m, p0, depth, j0, cols, out);
  } else {
    pack_b<kPanelCols>(m, p0, depth, j0, cols, out);
  }
}

// C tiles are requested this many kernel calls before their turn: with a short depth chunk a
// call is too short to wait for its C lines from memory.
constexpr int64_t kCallsAhead = 2;

// Requests the C lines of kernel call `call` of a block; `c` is the block's corner.
template <class Micro>
void prefetch_c_tile(const float* c, int64_t ldc, const CallOrder& order, int64_t call) {
  if (call >= order.calls()) return;
  auto [row_panel, col_panel] = order.panels(call);
  const int64_t i = row_panel * Micro::kRows, j = col_panel * Micro::kCols;
  const int64_t tile_rows = std::min(Micro::kRows, order.rows - i);
  const int64_t bytes = std::min(Micro::kCols, order.cols - j) * int64_t(sizeof(float));
  for (int64_t r = 0; r < tile_rows; ++r) {
    const char* line = reinterpret_cast<const char*>(c + (i + r) * ldc + j);
    for (int64_t offset = 0; offset < bytes; offset += 64) _mm_prefetch(line + offset, _MM_HINT_T0);
  }
}

// One tile: C_tile (+)= op(A)[tile rows, :] op(B)[:, tile cols]. `a`, `b` and `c` start at the
// tile's corner (row0, col0), so only t.rows and t.cols are read here; `c` has row stride ldc, in
// fp32 (the caller provides a converted copy for half outputs).
template <class Micro, class T>
void run_tile(const Operand<T>& a, const Operand<T>& b, int64_t depth, const Tile& t, float* c,
              int64_t ldc, bool accumulate) {
  if (depth == 0) {
    if (!accumulate)
      for (int64_t r = 0; r < t.rows; ++r) std::fill_n(c + r * ldc, t.cols, 0.0f);
    return;
  }
  using Packed = typename Micro::Packed;
  constexpr int64_t kChunk = Micro::kDepthChunk, kChunkSteps = kChunk / Micro::kDepthPerStep;
  const int64_t padded_rows = (t.rows + Micro::kRows - 1) / Micro::kRows * Micro::kRows;
  const int64_t chunks = (depth + kChunk - 1) / kChunk;
  const int64_t col_blocks = (t.cols + kBlockCols - 1) / kBlockCols;
  // Blocks (depth chunk x column block) run column block by column block, so that each C block
  // stays in L2 over the whole depth instead of going to memory and back once per chunk; that
  // needs the tile's A packed for every chunk at once. When that is too big (a very deep
  // product), they run chunk by chunk with one packed A chunk.
  const bool a_resident = padded_rows * chunks * kChunkSteps <= kMaxResidentAWords;
  Packed* a_block =
      scratch.a_block.get<Packed>(size_t(padded_rows * kChunkSteps * (a_resident ? chunks : 1)));
  Packed* b_block = scratch.b_block.get<Packed>(size_t(kChunkSteps * kBlockCols));
  auto block_at = [&](int64_t n) -> std::pair<int64_t, int64_t> {  // (chunk, column block)
    if (a_resident) return {n % chunks, n / chunks};
    return {n / col_blocks, n % col_blocks};
  };
  for (int64_t n = 0; n < chunks * col_blocks; ++n) {
    auto [chunk_index, col_block] = block_at(n);
    const int64_t p0 = chunk_index * kChunk, j0 = col_block * kBlockCols;
    const int64_t chunk = std::min(kChunk, depth - p0);
    const int64_t steps = steps_of(chunk, Micro::kDepthPerStep);
    const int64_t block_cols = std::min(kBlockCols, t.cols - j0);
    const bool load_c = accumulate || p0 > 0;
    Packed* a_chunk = a_block + (a_resident ? chunk_index * padded_rows * kChunkSteps : 0);
    if (col_block == 0) {  // the first block of this chunk: pack its A
      pack_panels<Micro, Micro::kRows>(flipped(a), p0, chunk, 0, t.rows, a_chunk);
    }
    pack_panels<Micro, Micro::kCols>(b, p0, chunk, j0, block_cols, b_block);
    // The next block's source lines are requested while this one computes.
    BlockSource<T> next;
    if (n + 1 < chunks * col_blocks) {
      auto [next_chunk, next_block] = block_at(n + 1);
      const int64_t next_p0 = next_chunk * kChunk, next_j0 = next_block * kBlockCols;
      next = block_source(b, next_p0, std::min(kChunk, depth - next_p0), next_j0,
                          std::min(kBlockCols, t.cols - next_j0));
    }
    // Spread the prefetches evenly over this block's kernel calls: bunched together they
    // would wait for free miss buffers instead of overlapping with the arithmetic.
    const CallOrder order = CallOrder::of<Micro>(t.rows, block_cols, steps);
    const int64_t calls = order.calls(), lines = next.segments * lines_per_segment(next);
    for (int64_t call = 0; call < calls; ++call) {
      prefetch_lines(next, call * lines / calls, (call + 1) * lines / calls);
      prefetch_c_tile<Micro>(c + j0, ldc, order, call + kCallsAhead);
      auto [row_panel, col_panel] = order.panels(call);
      const int64_t i = row_panel * Micro::kRows, j = col_panel * Micro::kCols;
      run_kernel<Micro>(steps, a_chunk + i * steps, b_block + j * steps, c + i * ldc + j0 + j, ldc,
                        std::min(Micro::kRows, t.rows - i), std::min(Micro::kCols, block_cols - j),
                        load_c);
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

template <class Micro, class T>
void run_all_tiles(const GroupedGemmArgs& args, const GroupedGemmLayout& layout) {
  int threads = omp_in_parallel() ? 1 : omp_get_max_threads();
  std::vector<Tile> tiles = plan_tiles<Micro>(args, layout, threads);
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
    int64_t c_offset = p.c_offset + t.row0 * p.ldc + t.col0;
    if (fp32_out) {
      run_tile<Micro>(a, b, p.k, t, static_cast<float*>(args.c) + c_offset, p.ldc, args.accumulate);
      continue;
    }
    if constexpr (!std::is_same_v<T, float>) {  // half output: accumulate in an fp32 copy
      T* c = static_cast<T*>(args.c) + c_offset;
      float* c_tile = scratch.c_tile.get<float>(size_t(t.rows * t.cols));
      if (args.accumulate) tile_to_float(c, p.ldc, t, c_tile);
      run_tile<Micro>(a, b, p.k, t, c_tile, t.cols, args.accumulate);
      tile_from_float(c_tile, t, c, p.ldc);
    }
  }
}

template <class Micro>
void run_micro(const GroupedGemmArgs& args, const GroupedGemmLayout& layout) {
  switch (args.input_dtype) {
    case DType::F32:
      return run_all_tiles<Micro, float>(args, layout);
    case DType::BF16:
      return run_all_tiles<Micro, bf16>(args, layout);
    case DType::F16:
      return run_all_tiles<Micro, f16>(args, layout);
    default:
      throw Error(detail::concat("grouped_gemm: the packed kernel has no ",
                                 dtype_name(args.input_dtype), " path"));
  }
}

}  // namespace

void grouped_gemm_packed(const GroupedGemmArgs& args, const GroupedGemmLayout& layout,
                         GroupedGemmKernel kernel) {
  switch (kernel) {
    case GroupedGemmKernel::kPackedAvx512Bf16:  // bf16 inputs only (grouped_gemm checks)
      return run_all_tiles<avx512_bf16::Micro, bf16>(args, layout);
    case GroupedGemmKernel::kPackedAvx512:
      return run_micro<avx512::Micro>(args, layout);
    case GroupedGemmKernel::kPackedAvx2:
      return run_micro<avx2::Micro>(args, layout);
    case GroupedGemmKernel::kAuto:
    case GroupedGemmKernel::kPerGroupBlas:
      break;
  }
  throw Error(detail::concat("grouped_gemm: ", grouped_gemm_kernel_name(kernel),
                             " is not a packed kernel"));
}

#pragma GCC pop_options

}  // namespace moe
