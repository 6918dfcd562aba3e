#include <algorithm>
#include <cmath>
#include <numbers>
#include <type_traits>
#include <vector>

#include "dropout_hash.h"
#include "moe/model/layers.h"
#include "moe/tensor/gemm.h"
#include "tensor/dtype_switch.h"

namespace moe::model {

namespace {

// dim: the query/key head size; value_dim: the value (and context) head size; seq: the query
// rows; key_seq: the key/value rows (the whole sequence; seq < key_seq with context parallelism).
struct HeadDims {
  int64_t batch, heads, groups, seq, dim, value_dim, key_seq;
};

HeadDims check_attention_inputs(const Tensor& q, const Tensor& k, const Tensor& v,
                                const char* what) {
  check_ndim(q, 4, detail::concat(what, " q"));
  check_ndim(k, 4, detail::concat(what, " k"));
  check_ndim(v, 4, detail::concat(what, " v"));
  HeadDims d{q.dim(0), q.dim(1), k.dim(1), q.dim(2), q.dim(3), v.dim(3), k.dim(2)};
  MOE_CHECK(q.dtype() == DType::F32 || q.dtype() == DType::F64, what,
            ": q, k, v must be F32 or F64, got ", dtype_name(q.dtype()));
  check_shape(k, {d.batch, d.groups, d.key_seq, d.dim}, detail::concat(what, " k"));
  check_shape(v, {d.batch, d.groups, d.key_seq, d.value_dim}, detail::concat(what, " v"));
  check_dtype(k, q.dtype(), detail::concat(what, " k"));
  check_dtype(v, q.dtype(), detail::concat(what, " v"));
  MOE_CHECK(d.groups >= 1 && d.heads % d.groups == 0, what, ": ", d.heads,
            " query heads do not divide into ", d.groups, " key/value groups");
  return d;
}

// The query runs of QueryPositions, checked against the shapes: (first local row, first global
// position, rows) each.
struct QueryRun {
  int64_t row, position, rows;
};
std::vector<QueryRun> query_runs(const QueryPositions& positions, const HeadDims& d,
                                 const char* what) {
  if (positions.starts.empty()) {
    MOE_CHECK(d.seq == d.key_seq, what, ": ", d.seq, " query rows but ", d.key_seq,
              " key rows; a subset of the queries needs their QueryPositions");
    return {{0, 0, d.seq}};
  }
  MOE_CHECK(positions.chunk * int64_t(positions.starts.size()) == d.seq, what, ": ",
            positions.starts.size(), " query chunks of ", positions.chunk, " rows but q has ",
            d.seq);
  std::vector<QueryRun> runs;
  for (size_t i = 0; i < positions.starts.size(); ++i) {
    int64_t start = positions.starts[i];
    MOE_CHECK(start >= 0 && start + positions.chunk <= d.key_seq, what, ": query chunk ", i,
              " at positions [", start, ", ", start + positions.chunk, ") is outside the ",
              d.key_seq, " keys");
    runs.push_back({int64_t(i) * positions.chunk, start, positions.chunk});
  }
  return runs;
}

// One dense product through the grouped GEMM (fp32 or fp64); see GemmForm for the shapes.
template <class C>
void product(GemmForm form, int64_t rows, int64_t k, int64_t n, const C* a, const C* b, C* c,
             bool accumulate) {
  GroupedGemmArgs args;
  args.form = form;
  args.groups = 1;
  args.group_rows = &rows;
  args.k = k;
  args.n = n;
  args.input_dtype = args.output_dtype = std::is_same_v<C, double> ? DType::F64 : DType::F32;
  args.a = a;
  args.b = b;
  args.c = c;
  args.accumulate = accumulate;
  grouped_gemm(args);
}

constexpr int64_t kQueryBlock = 64;  // query rows per block; a block reads keys [0, last + 1)

// The causal softmax of `rows` query rows (q_rows [rows, dim], global positions [position,
// position + rows)) of one head against keys [0, position + rows), into p [rows, position +
// rows] (zeros right of the diagonal). Keys after the block's last query are never touched,
// which halves the work of a full s x s product. With lse_out the row log-sum-exps of the scaled
// scores are computed into it ([rows]); otherwise lse_in's are used, so backward rebuilds
// exactly the forward's probabilities.
template <class C>
void causal_softmax_block(int64_t position, int64_t rows, int64_t dim, const C* q_rows, const C* k,
                          C* lse_out, const C* lse_in, C* p) {
  C scale = C(1) / std::sqrt(C(dim));
  int64_t keys = position + rows;
  // scores = q_block k^T (the grad-input form: [rows, d] x [keys, d]^T).
  product<C>(GemmForm::kGradInput, rows, keys, dim, q_rows, k, p, false);
  for (int64_t r = 0; r < rows; ++r) {
    C* row = p + r * keys;
    int64_t last = position + r;  // the query's own position
    if (lse_out != nullptr) {
      C max_score = row[0] * scale;
      for (int64_t j = 1; j <= last; ++j) max_score = std::max(max_score, row[j] * scale);
      C total = 0;
      for (int64_t j = 0; j <= last; ++j) total += std::exp(row[j] * scale - max_score);
      lse_out[r] = max_score + std::log(total);
    }
    C lse = lse_out != nullptr ? lse_out[r] : lse_in[r];
    for (int64_t j = 0; j <= last; ++j) row[j] = std::exp(row[j] * scale - lse);
    std::fill(row + last + 1, row + keys, C(0));  // causal: no attention to later positions
  }
}

// The dropout multiplier (0 or 1 / (1 - p)) of the score of (query, key) positions of head
// `head` of sequence b: the same hash as apply_dropout over the element's index in the global
// [batch, heads, key_seq, key_seq] scores, so every tp and cp layout draws the same mask.
template <class C>
C attention_dropout_multiplier(const AttentionDropout& dropout, const HeadDims& d, int64_t b,
                               int64_t head, int64_t query, int64_t key) {
  int64_t total_heads = dropout.total_heads > 0 ? dropout.total_heads : d.heads;
  int64_t index =
      ((b * total_heads + dropout.head_offset + head) * d.key_seq + query) * d.key_seq + key;
  return dropout_keeps(dropout.key, index, dropout_threshold(dropout.p))
             ? C(1) / (C(1) - C(dropout.p))
             : C(0);
}

// Multiplies p [rows, keys] of the query rows at global positions [position, position + rows) of
// head `head` of sequence b by their dropout multipliers.
template <class C>
void apply_mask_block(const AttentionDropout& dropout, const HeadDims& d, int64_t b, int64_t head,
                      int64_t position, int64_t rows, int64_t keys, C* p) {
  if (dropout.p == 0) return;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < keys; ++j) {
      p[r * keys + j] *= attention_dropout_multiplier<C>(dropout, d, b, head, position + r, j);
    }
  }
}

template <class C>
void attention_forward_typed(const HeadDims& d, const std::vector<QueryRun>& runs, const C* q,
                             const C* k, const C* v, const AttentionDropout& dropout, C* logsumexp,
                             C* context) {
  int64_t heads_per_group = d.heads / d.groups;
  int64_t s = d.seq, block = s * d.dim, value_block = s * d.value_dim;
  int64_t key_block = d.key_seq * d.dim, key_value_block = d.key_seq * d.value_dim;
#pragma omp parallel for schedule(dynamic)
  for (int64_t bh = 0; bh < d.batch * d.heads; ++bh) {
    int64_t b = bh / d.heads, h = bh % d.heads, g = h / heads_per_group;
    const C* kg = k + (b * d.groups + g) * key_block;
    const C* vg = v + (b * d.groups + g) * key_value_block;
    std::vector<C> p;
    for (const QueryRun& run : runs) {
      for (int64_t i0 = 0; i0 < run.rows; i0 += kQueryBlock) {
        int64_t rows = std::min(kQueryBlock, run.rows - i0), row = run.row + i0;
        int64_t position = run.position + i0, keys = position + rows;
        p.resize(size_t(rows * keys));
        causal_softmax_block<C>(position, rows, d.dim, q + bh * block + row * d.dim, kg,
                                logsumexp + bh * s + row, nullptr, p.data());
        apply_mask_block<C>(dropout, d, b, h, position, rows, keys, p.data());
        // context rows = p v[0:keys].
        product<C>(GemmForm::kForward, rows, keys, d.value_dim, p.data(), vg,
                   context + bh * value_block + row * d.value_dim, false);
      }
    }
  }
}

template <class C>
void attention_backward_typed(const HeadDims& d, const std::vector<QueryRun>& runs, const C* q,
                              const C* k, const C* v, const C* logsumexp,
                              const AttentionDropout& dropout, const C* dcontext, C* dq, C* dk,
                              C* dv) {
  int64_t heads_per_group = d.heads / d.groups;
  C scale = C(1) / std::sqrt(C(d.dim));
  int64_t s = d.seq, block = s * d.dim, value_block = s * d.value_dim;
  int64_t key_block = d.key_seq * d.dim, key_value_block = d.key_seq * d.value_dim;
  // One task per key/value group: its heads add into the same dk, dv in a fixed order.
#pragma omp parallel for schedule(dynamic)
  for (int64_t bg = 0; bg < d.batch * d.groups; ++bg) {
    int64_t b = bg / d.groups, g = bg % d.groups;
    const C* kg = k + bg * key_block;
    const C* vg = v + bg * key_value_block;
    C* dkg = dk + bg * key_block;
    C* dvg = dv + bg * key_value_block;
    std::fill(dkg, dkg + key_block, C(0));
    std::fill(dvg, dvg + key_value_block, C(0));
    std::vector<C> p, dropped, dscores;
    for (int64_t h = g * heads_per_group; h < (g + 1) * heads_per_group; ++h) {
      int64_t bh = b * d.heads + h;
      for (const QueryRun& run : runs) {
        for (int64_t i0 = 0; i0 < run.rows; i0 += kQueryBlock) {
          int64_t rows = std::min(kQueryBlock, run.rows - i0), row = run.row + i0;
          int64_t position = run.position + i0, keys = position + rows;
          size_t scratch = size_t(rows * keys);
          p.resize(scratch);
          dropped.resize(scratch);
          dscores.resize(scratch);
          const C* dctx = dcontext + bh * value_block + row * d.value_dim;
          const C* q_rows = q + bh * block + row * d.dim;
          // The probabilities are rebuilt from the saved log-sum-exps instead of stored.
          causal_softmax_block<C>(position, rows, d.dim, q_rows, kg, nullptr,
                                  logsumexp + bh * s + row, p.data());
          std::copy_n(p.data(), scratch, dropped.data());
          apply_mask_block<C>(dropout, d, b, h, position, rows, keys, dropped.data());
          // dv[0:keys] += dropped^T dcontext_rows; d(dropped) = dcontext_rows v[0:keys]^T.
          product<C>(GemmForm::kGradWeight, rows, keys, d.value_dim, dropped.data(), dctx, dvg,
                     true);
          product<C>(GemmForm::kGradInput, rows, keys, d.value_dim, dctx, vg, dscores.data(),
                     false);
          apply_mask_block<C>(dropout, d, b, h, position, rows, keys, dscores.data());
          // Through softmax: dscore_ij = p_ij (dp_ij - sum_j' p_ij' dp_ij') * scale.
          for (int64_t r = 0; r < rows; ++r) {
            C* score_row = dscores.data() + r * keys;
            const C* prow = p.data() + r * keys;
            C weighted = 0;
            for (int64_t j = 0; j < keys; ++j) weighted += prow[j] * score_row[j];
            for (int64_t j = 0; j < keys; ++j) {
              score_row[j] = prow[j] * (score_row[j] - weighted) * scale;
            }
          }
          // dq rows = dscores k[0:keys]; dk[0:keys] += dscores^T q rows.
          product<C>(GemmForm::kForward, rows, keys, d.dim, dscores.data(), kg,
                     dq + bh * block + row * d.dim, false);
          product<C>(GemmForm::kGradWeight, rows, keys, d.dim, dscores.data(), q_rows, dkg, true);
        }
      }
    }
  }
}

// Moves head vectors between Megatron's row layout and head-major blocks, either way.
// rows: [s * B + b] x (groups x [q_0 .. q_{n/g-1}, k, v] x d); q [B, n, S, d]; k, v [B, g, S, d].
void move_qkv(Tensor& rows, Tensor& q, Tensor& k, Tensor& v, bool to_heads) {
  int64_t B = q.dim(0), heads = q.dim(1), S = q.dim(2), d = q.dim(3), groups = k.dim(1);
  int64_t per_group = heads / groups;
  size_t head_bytes = size_t(d) * dtype_size(q.dtype());
  auto move = [&](char* row_part, Tensor& heads_tensor, int64_t offset) {
    char* head = static_cast<char*>(heads_tensor.raw()) + size_t(offset) * head_bytes;
    if (to_heads) {
      std::copy_n(row_part, head_bytes, head);
    } else {
      std::copy_n(head, head_bytes, row_part);
    }
  };
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t b = 0; b < B; ++b) {
      char* row = static_cast<char*>(rows.raw()) +
                  size_t((s * B + b) * groups * (per_group + 2)) * head_bytes;
      for (int64_t g = 0; g < groups; ++g) {
        char* group = row + size_t(g * (per_group + 2)) * head_bytes;
        for (int64_t j = 0; j < per_group; ++j) {
          move(group + size_t(j) * head_bytes, q, (b * heads + g * per_group + j) * S + s);
        }
        move(group + size_t(per_group) * head_bytes, k, (b * groups + g) * S + s);
        move(group + size_t(per_group + 1) * head_bytes, v, (b * groups + g) * S + s);
      }
    }
  }
}

// rows [S * B, n * d] <-> heads [B, n, S, d], either way.
void move_context(Tensor& rows, Tensor& heads, bool to_heads) {
  int64_t B = heads.dim(0), n = heads.dim(1), S = heads.dim(2);
  size_t head_bytes = size_t(heads.dim(3)) * dtype_size(heads.dtype());
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < n; ++h) {
      for (int64_t s = 0; s < S; ++s) {
        char* head = static_cast<char*>(heads.raw()) + size_t((b * n + h) * S + s) * head_bytes;
        char* row = static_cast<char*>(rows.raw()) + size_t((s * B + b) * n + h) * head_bytes;
        if (to_heads) {
          std::copy_n(row, head_bytes, head);
        } else {
          std::copy_n(head, head_bytes, row);
        }
      }
    }
  }
}

// Context parallelism: moves [B, g, 2c, d] blocks between rank order (ranked [cp * B, g, 2c, d],
// what the all-gather over cp returns) and the global sequence order (full [B, g, 2cp * c, d]),
// either way; cp rank r's two chunks sit at chunks r and 2 * cp - 1 - r.
void move_sequence_chunks(Tensor& ranked, Tensor& full, int cp, bool to_full) {
  int64_t B = full.dim(0), groups = full.dim(1), S = full.dim(2), d = full.dim(3);
  int64_t chunk = S / (2 * cp);
  size_t chunk_bytes = size_t(chunk * d) * dtype_size(full.dtype());
  for (int r = 0; r < cp; ++r) {
    for (int64_t bg = 0; bg < B * groups; ++bg) {
      for (int half = 0; half < 2; ++half) {
        int64_t global_chunk = half == 0 ? r : 2 * cp - 1 - r;
        char* own = static_cast<char*>(ranked.raw()) +
                    size_t((int64_t(r) * B * groups + bg) * 2 + half) * chunk_bytes;
        char* global =
            static_cast<char*>(full.raw()) + size_t(bg * 2 * cp + global_chunk) * chunk_bytes;
        if (to_full) {
          std::copy_n(own, chunk_bytes, global);
        } else {
          std::copy_n(global, chunk_bytes, own);
        }
      }
    }
  }
}

// Every cp rank's [B, g, s, d] keys (or values) in global sequence order, [B, g, s * cp, d].
Tensor gather_sequence(const Tensor& local, const ContextParallel& cp) {
  Tensor ranked = Tensor::empty(
      {cp.size() * local.dim(0), local.dim(1), local.dim(2), local.dim(3)}, local.dtype());
  comm::all_gather(local, ranked, cp.group);
  Tensor full = Tensor::empty({local.dim(0), local.dim(1), local.dim(2) * cp.size(), local.dim(3)},
                              local.dtype());
  move_sequence_chunks(ranked, full, cp.size(), /*to_full=*/true);
  return full;
}

// The adjoint of gather_sequence: each rank's full-sequence gradient summed over cp onto the
// chunks this rank owns, [B, g, S / cp, d].
Tensor reduce_scatter_sequence(Tensor& full, const ContextParallel& cp) {
  Tensor ranked = Tensor::empty(
      {cp.size() * full.dim(0), full.dim(1), full.dim(2) / cp.size(), full.dim(3)}, full.dtype());
  move_sequence_chunks(ranked, full, cp.size(), /*to_full=*/false);
  Tensor own =
      Tensor::empty({full.dim(0), full.dim(1), full.dim(2) / cp.size(), full.dim(3)}, full.dtype());
  comm::reduce_scatter(ranked, own, cp.group);
  return own;
}

}  // namespace

RotaryFrequencies rope_frequencies(int64_t dim, double rotary_base) {
  MOE_CHECK(dim >= 2 && dim % 2 == 0, "rope needs an even head dimension, got ", dim);
  MOE_CHECK(rotary_base > 0, "rotary_base (", rotary_base, ") must be > 0");
  RotaryFrequencies frequencies;
  for (int64_t i = 0; i < dim / 2; ++i) {
    frequencies.inv_freq.push_back(std::pow(rotary_base, -double(2 * i) / double(dim)));
  }
  return frequencies;
}

double yarn_get_mscale(double scale, double mscale) {
  return scale <= 1 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

RotaryFrequencies yarn_frequencies(int64_t dim, double rotary_base, const YarnScaling& yarn) {
  MOE_CHECK(yarn.scaling_factor > 0, "rotary_scaling_factor (", yarn.scaling_factor,
            ") must be > 0");
  MOE_CHECK(yarn.original_max_position_embeddings >= 1, "yarn_original_max_position_embeddings (",
            yarn.original_max_position_embeddings, ") must be >= 1");
  MOE_CHECK(yarn.beta_fast > 0 && yarn.beta_slow > 0, "yarn_beta_fast (", yarn.beta_fast,
            ") and yarn_beta_slow (", yarn.beta_slow, ") must be > 0");
  RotaryFrequencies frequencies = rope_frequencies(dim, rotary_base);
  // The pair index that makes `turns` rotations over the original context.
  auto index_of = [&](double turns) {
    return double(dim) *
           std::log(double(yarn.original_max_position_embeddings) /
                    (turns * 2 * std::numbers::pi)) /
           (2 * std::log(rotary_base));
  };
  double low = index_of(yarn.beta_fast), high = index_of(yarn.beta_slow);
  if (yarn.correction_range_round_to_int) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, double(dim - 1));
  if (low == high) high += 0.001;  // a step instead of a division by zero
  for (size_t i = 0; i < frequencies.inv_freq.size(); ++i) {
    // ramp 0: the original frequency (extrapolation); 1: divided by the factor (interpolation).
    double ramp = std::clamp((double(i) - low) / (high - low), 0.0, 1.0);
    double original = frequencies.inv_freq[i];
    frequencies.inv_freq[i] = original / yarn.scaling_factor * ramp + original * (1 - ramp);
  }
  frequencies.concentration = yarn_get_mscale(yarn.scaling_factor, yarn.mscale) /
                              yarn_get_mscale(yarn.scaling_factor, yarn.mscale_all_dim);
  return frequencies;
}

void apply_rotary(Tensor& x, const RotaryFrequencies& frequencies, bool backward,
                  std::span<const int64_t> positions) {
  check_ndim(x, 4, "rope input");
  int64_t outer = x.dim(0) * x.dim(1), seq = x.dim(2), dim = x.dim(3), half = dim / 2;
  MOE_CHECK(dim % 2 == 0, "rope needs an even head dimension, got ", dim);
  MOE_CHECK(size_t(half) == frequencies.inv_freq.size(), "rope input head dimension ", dim,
            " does not match the ", frequencies.inv_freq.size(), " rotary frequencies");
  MOE_CHECK(x.dtype() == DType::F32 || x.dtype() == DType::F64,
            "rope input must be F32 or F64, got ", dtype_name(x.dtype()));
  MOE_CHECK(positions.empty() || int64_t(positions.size()) == seq, "rope got ", positions.size(),
            " positions for a sequence of ", seq);
  // cos and sin in double (Megatron's layout: pairs i, i + d/2), times the concentration.
  std::vector<double> cosines(size_t(seq * half)), sines(size_t(seq * half));
  for (int64_t pos = 0; pos < seq; ++pos) {
    double position = positions.empty() ? double(pos) : double(positions[size_t(pos)]);
    for (int64_t i = 0; i < half; ++i) {
      double angle = position * frequencies.inv_freq[size_t(i)];
      double sine = frequencies.concentration * std::sin(angle);
      cosines[size_t(pos * half + i)] = frequencies.concentration * std::cos(angle);
      sines[size_t(pos * half + i)] = backward ? -sine : sine;
    }
  }
  auto rotate = [&](auto* values) {
    using C = std::remove_pointer_t<decltype(values)>;
#pragma omp parallel for schedule(static) if (outer * seq * dim > 65536)
    for (int64_t o = 0; o < outer; ++o) {
      for (int64_t pos = 0; pos < seq; ++pos) {
        C* head = values + (o * seq + pos) * dim;
        for (int64_t i = 0; i < half; ++i) {
          C c = C(cosines[size_t(pos * half + i)]), s = C(sines[size_t(pos * half + i)]);
          C first = head[i], second = head[i + half];
          head[i] = first * c - second * s;
          head[i + half] = second * c + first * s;
        }
      }
    }
  };
  if (x.dtype() == DType::F64) {
    rotate(x.data<double>());
  } else {
    rotate(x.data<float>());
  }
}

void apply_rope(Tensor& x, float rotary_base, bool backward) {
  check_ndim(x, 4, "rope input");
  apply_rotary(x, rope_frequencies(x.dim(3), rotary_base), backward);
}

void causal_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                              const AttentionDropout& dropout, Tensor& logsumexp, Tensor& context,
                              const QueryPositions& positions) {
  HeadDims d = check_attention_inputs(q, k, v, "causal_attention_forward");
  std::vector<QueryRun> runs = query_runs(positions, d, "causal_attention_forward");
  check_shape(logsumexp, {d.batch, d.heads, d.seq}, "attention log-sum-exp");
  check_shape(context, {d.batch, d.heads, d.seq, d.value_dim}, "attention context");
  check_dtype(logsumexp, q.dtype(), "attention log-sum-exp");
  check_dtype(context, q.dtype(), "attention context");
  if (q.dtype() == DType::F64) {
    attention_forward_typed<double>(d, runs, q.data<double>(), k.data<double>(), v.data<double>(),
                                    dropout, logsumexp.data<double>(), context.data<double>());
  } else {
    attention_forward_typed<float>(d, runs, q.data<float>(), k.data<float>(), v.data<float>(),
                                   dropout, logsumexp.data<float>(), context.data<float>());
  }
}

void causal_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& logsumexp, const AttentionDropout& dropout,
                               const Tensor& dcontext, Tensor& dq, Tensor& dk, Tensor& dv,
                               const QueryPositions& positions) {
  HeadDims d = check_attention_inputs(q, k, v, "causal_attention_backward");
  std::vector<QueryRun> runs = query_runs(positions, d, "causal_attention_backward");
  check_shape(logsumexp, {d.batch, d.heads, d.seq}, "attention log-sum-exp");
  check_shape(dcontext, {d.batch, d.heads, d.seq, d.value_dim}, "attention context gradient");
  check_shape(dq, q.shape(), "attention q gradient");
  check_shape(dk, k.shape(), "attention k gradient");
  check_shape(dv, v.shape(), "attention v gradient");
  for (const Tensor* t : {&logsumexp, &dcontext, static_cast<const Tensor*>(&dq),
                          static_cast<const Tensor*>(&dk), static_cast<const Tensor*>(&dv)}) {
    check_dtype(*t, q.dtype(), "attention gradient");
  }
  if (q.dtype() == DType::F64) {
    attention_backward_typed<double>(d, runs, q.data<double>(), k.data<double>(), v.data<double>(),
                                     logsumexp.data<double>(), dropout, dcontext.data<double>(),
                                     dq.data<double>(), dk.data<double>(), dv.data<double>());
  } else {
    attention_backward_typed<float>(d, runs, q.data<float>(), k.data<float>(), v.data<float>(),
                                    logsumexp.data<float>(), dropout, dcontext.data<float>(),
                                    dq.data<float>(), dk.data<float>(), dv.data<float>());
  }
}

namespace reference {

// Loops over every (query, key) pair with an explicit causal mask and double sums.
void causal_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                              const AttentionDropout& dropout, Tensor& logsumexp, Tensor& context) {
  HeadDims d = check_attention_inputs(q, k, v, "reference::causal_attention_forward");
  MOE_CHECK(d.seq == d.key_seq, "reference::causal_attention_forward: ", d.seq, " query rows but ",
            d.key_seq, " key rows");
  int64_t per_group = d.heads / d.groups;
  double scale = 1.0 / std::sqrt(double(d.dim));
  auto at = [&](int64_t b, int64_t h, int64_t heads, int64_t pos, int64_t c) {
    return ((b * heads + h) * d.seq + pos) * d.dim + c;
  };
  auto value_at = [&](int64_t b, int64_t h, int64_t heads, int64_t pos, int64_t c) {
    return ((b * heads + h) * d.seq + pos) * d.value_dim + c;
  };
  for (int64_t b = 0; b < d.batch; ++b) {
    for (int64_t h = 0; h < d.heads; ++h) {
      int64_t g = h / per_group;
      for (int64_t i = 0; i < d.seq; ++i) {
        std::vector<double> weights(size_t(d.seq), 0.0);
        double max_score = -INFINITY;
        for (int64_t j = 0; j <= i; ++j) {
          double score = 0;
          for (int64_t c = 0; c < d.dim; ++c) {
            score += double(q.get(at(b, h, d.heads, i, c))) * k.get(at(b, g, d.groups, j, c));
          }
          weights[size_t(j)] = score * scale;
          max_score = std::max(max_score, weights[size_t(j)]);
        }
        double total = 0;
        for (int64_t j = 0; j <= i; ++j) {
          weights[size_t(j)] = std::exp(weights[size_t(j)] - max_score);
          total += weights[size_t(j)];
        }
        logsumexp.set((b * d.heads + h) * d.seq + i, float(max_score + std::log(total)));
        for (int64_t j = 0; j <= i; ++j) weights[size_t(j)] /= total;
        for (int64_t c = 0; c < d.value_dim; ++c) {
          double value = 0;
          for (int64_t j = 0; j <= i; ++j) {
            double kept =
                dropout.p == 0 ? 1.0 : attention_dropout_multiplier<double>(dropout, d, b, h, i, j);
            value += weights[size_t(j)] * kept * v.get(value_at(b, g, d.groups, j, c));
          }
          context.set(value_at(b, h, d.heads, i, c), float(value));
        }
      }
    }
  }
}

}  // namespace reference

SelfAttention::SelfAttention(ParameterStore& store, const std::string& prefix,
                             const TransformerConfig& config, const TensorParallel& tp,
                             const ContextParallel& cp)
    : tp_(tp),
      cp_(cp),
      heads_local_(divide_over_tp(config.num_attention_heads, tp.size(), "num_attention_heads")),
      groups_local_(divide_over_tp(config.query_groups(), tp.size(), "num_query_groups")),
      head_dim_(config.head_dim()),
      attention_dropout_(config.attention_dropout),
      recompute_core_attention_(config.recomputes("core_attn")),
      qkv_(store, prefix + ".linear_qkv", config.hidden_size,
           ColumnLayout{{config.query_groups(),
                         config.num_attention_heads / config.query_groups() + 2, config.head_dim()},
                        0},
           config.add_bias_linear || config.add_qkv_bias, tp),
      proj_(store, prefix + ".linear_proj", int64_t(config.num_attention_heads) * config.head_dim(),
            config.hidden_size, config.add_bias_linear, tp) {
  if (config.position_embedding_type == "rope") {
    rotary_ = rope_frequencies(head_dim_, config.rotary_base);
  } else if (config.position_embedding_type == "yarn") {
    YarnScaling yarn;
    yarn.scaling_factor = config.rotary_scaling_factor;
    yarn.original_max_position_embeddings = config.yarn_original_max_position_embeddings;
    yarn.beta_fast = config.yarn_beta_fast;
    yarn.beta_slow = config.yarn_beta_slow;
    yarn.mscale = config.mscale;
    yarn.mscale_all_dim = config.mscale_all_dim;
    yarn.correction_range_round_to_int = config.yarn_correction_range_round_to_int;
    rotary_ = yarn_frequencies(head_dim_, config.rotary_base, yarn);
  }
  if (config.qk_layernorm) {
    q_norm_.emplace(store, prefix + ".q_layernorm", head_dim_, config.normalization,
                    config.norm_epsilon);
    k_norm_.emplace(store, prefix + ".k_layernorm", head_dim_, config.normalization,
                    config.norm_epsilon);
  }
}

std::vector<ParamHandle> SelfAttention::tensor_parallel_partial_params() const {
  std::vector<ParamHandle> partial;
  if (tp_.size() == 1) return partial;
  for (const std::optional<Norm>* norm : {&q_norm_, &k_norm_}) {
    if (!*norm) continue;
    partial.push_back((*norm)->weight());
    if ((*norm)->bias().index >= 0) partial.push_back((*norm)->bias());
  }
  return partial;
}

QueryPositions SelfAttention::query_positions(int64_t local_seq) const {
  if (cp_.size() == 1) return {};
  MOE_CHECK(local_seq % 2 == 0, "context parallelism splits each rank's ", local_seq,
            " positions into two chunks; the sequence length must be divisible by 2 x "
            "context_parallel_size (",
            2 * cp_.size(), ")");
  return {local_seq / 2,
          {cp_.global_position(0, local_seq), cp_.global_position(local_seq / 2, local_seq)}};
}

Tensor SelfAttention::forward(const ParameterStore& store, const Tensor& x, BatchShape shape,
                              uint64_t attention_dropout_key, bool training, Context& ctx) const {
  ctx.input = x;  // this rank's rows: backward gathers them again (sequence parallelism)
  ctx.shape = shape;
  ctx.dropout_key = attention_dropout_key;
  Tensor input = enter_tp_region(x, tp_);
  MOE_CHECK(input.dim(0) == shape.rows(), "attention input has ", input.dim(0),
            " rows but the micro-batch has seq ", shape.seq, " x batch ", shape.batch);
  Tensor mixed = qkv_.forward(store, input);  // [rows, groups_local * (per_group + 2) * d]
  int64_t d = head_dim_, S = shape.seq, B = shape.batch;
  DType compute = x.dtype() == DType::F64 ? DType::F64 : DType::F32;
  Tensor mixed_c = mixed.to(compute);
  ctx.q = Tensor::empty({B, heads_local_, S, d}, compute);
  ctx.k = Tensor::empty({B, groups_local_, S, d}, compute);
  ctx.v = Tensor::empty({B, groups_local_, S, d}, compute);
  move_qkv(mixed_c, ctx.q, ctx.k, ctx.v, /*to_heads=*/true);
  if (q_norm_) {  // each head vector is one norm row; the layout stays [b, n, s, d]
    ctx.q = q_norm_->forward(store, ctx.q.reshape({-1, d}), ctx.q_norm).reshape(ctx.q.shape());
    ctx.k = k_norm_->forward(store, ctx.k.reshape({-1, d}), ctx.k_norm).reshape(ctx.k.shape());
  }
  std::vector<int64_t> positions =
      cp_.size() > 1 ? cp_.global_positions(S) : std::vector<int64_t>{};
  if (rotary_) {
    apply_rotary(ctx.q, *rotary_, false, positions);
    apply_rotary(ctx.k, *rotary_, false, positions);
  }
  if (cp_.size() > 1) {
    ctx.k = gather_sequence(ctx.k, cp_);
    ctx.v = gather_sequence(ctx.v, cp_);
  }
  ctx.attention_dropout = training ? attention_dropout_ : 0.0f;
  ctx.context = core_attention(ctx, x.dtype(), ctx.logsumexp);
  Tensor out = leave_tp_region(proj_.forward_partial(store, ctx.context), tp_);
  proj_.add_bias(store, out);
  if (recompute_core_attention_) ctx.context = ctx.logsumexp = Tensor();  // backward rebuilds
  return out;
}

Tensor SelfAttention::core_attention(const Context& ctx, DType dtype, Tensor& logsumexp) const {
  const int64_t d = head_dim_, S = ctx.shape.seq, B = ctx.shape.batch;
  const DType compute = ctx.q.dtype();
  AttentionDropout dropout{ctx.attention_dropout, ctx.dropout_key,
                           int64_t(tp_.rank()) * heads_local_, int64_t(tp_.size()) * heads_local_};
  logsumexp = Tensor::empty({B, heads_local_, S}, compute);
  Tensor context = Tensor::empty({B, heads_local_, S, d}, compute);
  causal_attention_forward(ctx.q, ctx.k, ctx.v, dropout, logsumexp, context, query_positions(S));
  Tensor context_rows = Tensor::empty({S * B, heads_local_ * d}, compute);
  move_context(context_rows, context, /*to_heads=*/false);
  return context_rows.to(dtype);
}

Tensor SelfAttention::backward(const ParameterStore& store, const Context& ctx,
                               const Tensor& grad_output) const {
  Tensor logsumexp = ctx.logsumexp, context = ctx.context;
  if (!context.defined()) context = core_attention(ctx, ctx.input.dtype(), logsumexp);
  proj_.backward_bias(store, grad_output);
  Tensor dy_full = leave_tp_region_backward(grad_output, tp_);
  Tensor dcontext_rows = proj_.backward(store, context, dy_full);
  int64_t per_group = heads_local_ / groups_local_, d = head_dim_, S = ctx.shape.seq,
          B = ctx.shape.batch;
  DType compute = ctx.q.dtype();
  Tensor dcontext_c = dcontext_rows.to(compute);
  Tensor dcontext = Tensor::empty({B, heads_local_, S, d}, compute);
  move_context(dcontext_c, dcontext, /*to_heads=*/true);
  AttentionDropout dropout{ctx.attention_dropout, ctx.dropout_key,
                           int64_t(tp_.rank()) * heads_local_, int64_t(tp_.size()) * heads_local_};
  Tensor dq = Tensor::empty(ctx.q.shape(), compute);
  Tensor dk = Tensor::empty(ctx.k.shape(), compute);
  Tensor dv = Tensor::empty(ctx.v.shape(), compute);
  causal_attention_backward(ctx.q, ctx.k, ctx.v, logsumexp, dropout, dcontext, dq, dk, dv,
                            query_positions(S));
  if (cp_.size() > 1) {
    dk = reduce_scatter_sequence(dk, cp_);
    dv = reduce_scatter_sequence(dv, cp_);
  }
  if (rotary_) {
    std::vector<int64_t> positions =
        cp_.size() > 1 ? cp_.global_positions(S) : std::vector<int64_t>{};
    apply_rotary(dq, *rotary_, true, positions);
    apply_rotary(dk, *rotary_, true, positions);
  }
  if (q_norm_) {
    dq = q_norm_->backward(store, ctx.q_norm, dq.reshape({-1, d})).reshape(dq.shape());
    dk = k_norm_->backward(store, ctx.k_norm, dk.reshape({-1, d})).reshape(dk.shape());
  }
  Tensor dmixed_c = Tensor::empty({S * B, groups_local_ * (per_group + 2) * d}, compute);
  move_qkv(dmixed_c, dq, dk, dv, /*to_heads=*/false);
  Tensor dmixed = dmixed_c.to(ctx.input.dtype());
  Tensor input = enter_tp_region(ctx.input, tp_);
  return enter_tp_region_backward(qkv_.backward(store, input, dmixed), tp_);
}

}  // namespace moe::model
