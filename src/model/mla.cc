#include "moe/model/mla.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "moe/tensor/ops.h"

namespace moe::model {

namespace {

// Calls f(C{}) with C the compute type of `dtype` (double for F64, float otherwise).
template <class F>
void with_compute_type(DType dtype, F&& f) {
  if (dtype == DType::F64) {
    f(double{});
  } else {
    f(float{});
  }
}

// One part of every head, between the row layout [S * B, heads * stride] (head h's columns
// start at h * stride) and head-major tensors [B, heads, S, dim]: columns [row_offset,
// row_offset + size) of a head's slot are elements [head_offset, head_offset + size) of its
// head vector.
struct HeadPart {
  int64_t stride, row_offset, head_offset, size;
  // Megatron's MLA rope (mla_rotary_interleaved) reorders a rotary part [x0, x1, x2, ...] to
  // [x0, x2, ..., x1, x3, ...] before rotating pairs (i, i + size / 2), so the pairs are the
  // adjacent outputs (2i, 2i + 1). Head element j then comes from slot column
  // 2j (j < size / 2) or 2 (j - size / 2) + 1.
  bool deinterleave = false;
};

void move_part(Tensor& rows, Tensor& heads, const HeadPart& part, bool to_heads) {
  int64_t B = heads.dim(0), n = heads.dim(1), S = heads.dim(2), dim = heads.dim(3);
  int64_t half = part.size / 2;
  with_compute_type(heads.dtype(), [&](auto tag) {
    using C = decltype(tag);
    C* row_data = rows.data<C>();
    C* head_data = heads.data<C>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < n; ++h) {
        for (int64_t s = 0; s < S; ++s) {
          C* slot = row_data + ((s * B + b) * n + h) * part.stride + part.row_offset;
          C* head = head_data + ((b * n + h) * S + s) * dim + part.head_offset;
          for (int64_t j = 0; j < part.size; ++j) {
            int64_t column = !part.deinterleave ? j : j < half ? 2 * j : 2 * (j - half) + 1;
            if (to_heads) {
              head[j] = slot[column];
            } else {
              slot[column] = head[j];
            }
          }
        }
      }
    }
  });
}

// dst[b, h, s, dst_offset + j] = src[b, h, s, src_offset + j] for j < size; a source with one
// head is broadcast to every head of dst (the shared rotary key).
void copy_head_part(const Tensor& src, int64_t src_offset, Tensor& dst, int64_t dst_offset,
                    int64_t size) {
  int64_t B = dst.dim(0), n = dst.dim(1), S = dst.dim(2);
  int64_t src_heads = src.dim(1), src_dim = src.dim(3), dst_dim = dst.dim(3);
  with_compute_type(dst.dtype(), [&](auto tag) {
    using C = decltype(tag);
    const C* from = src.data<C>();
    C* to = dst.data<C>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < n; ++h) {
        int64_t source_head = src_heads == 1 ? 0 : h;
        for (int64_t s = 0; s < S; ++s) {
          std::copy_n(from + ((b * src_heads + source_head) * S + s) * src_dim + src_offset, size,
                      to + ((b * n + h) * S + s) * dst_dim + dst_offset);
        }
      }
    }
  });
}

// The broadcast's backward: dst [B, 1, S, size] = sum over heads (in head order) of
// src[b, h, s, offset : offset + size].
Tensor sum_head_part(const Tensor& src, int64_t offset, int64_t size) {
  int64_t B = src.dim(0), n = src.dim(1), S = src.dim(2), dim = src.dim(3);
  Tensor dst = Tensor::zeros({B, 1, S, size}, src.dtype());
  with_compute_type(src.dtype(), [&](auto tag) {
    using C = decltype(tag);
    const C* from = src.data<C>();
    C* to = dst.data<C>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < n; ++h) {
        for (int64_t s = 0; s < S; ++s) {
          const C* head = from + ((b * n + h) * S + s) * dim + offset;
          C* total = to + (b * S + s) * size;
          for (int64_t j = 0; j < size; ++j) total[j] += head[j];
        }
      }
    }
  });
  return dst;
}

// x *= factor in x's compute type (ops' scale takes a float factor, which would round the fp64
// one that gradient checks and references use).
void multiply(Tensor& x, double factor) {
  with_compute_type(x.dtype(), [&](auto tag) {
    using C = decltype(tag);
    C* values = x.data<C>();
    for (int64_t i = 0; i < x.numel(); ++i) values[i] *= C(factor);
  });
}

// Megatron's MLA rotary frequencies (see mla.h).
RotaryFrequencies mla_rotary(const TransformerConfig& config) {
  if (config.rope_type == "rope") {
    return rope_frequencies(config.qk_pos_emb_head_dim, config.rotary_base);
  }
  YarnScaling yarn;  // its defaults are Megatron's MLATransformerConfig's
  yarn.scaling_factor = config.rotary_scaling_factor;
  yarn.mscale = config.mscale;
  yarn.mscale_all_dim = config.mscale_all_dim;
  return yarn_frequencies(config.qk_pos_emb_head_dim, config.rotary_base, yarn);
}

// Columns [first, first + count) of a 2-D tensor, as a new tensor.
Tensor columns(const Tensor& t, int64_t first, int64_t count) {
  int64_t rows = t.dim(0), width = t.dim(1);
  size_t element = dtype_size(t.dtype());
  Tensor out = Tensor::empty({rows, count}, t.dtype());
  const char* from = static_cast<const char*>(t.raw());
  char* to = static_cast<char*>(out.raw());
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(to + size_t(r * count) * element, from + size_t(r * width + first) * element,
                size_t(count) * element);
  }
  return out;
}

// dst[:, first : first + src columns] = src (same rows and dtype).
void set_columns(const Tensor& src, Tensor& dst, int64_t first) {
  int64_t rows = src.dim(0), count = src.dim(1), width = dst.dim(1);
  size_t element = dtype_size(src.dtype());
  const char* from = static_cast<const char*>(src.raw());
  char* to = static_cast<char*>(dst.raw());
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(to + size_t(r * width + first) * element, from + size_t(r * count) * element,
                size_t(count) * element);
  }
}

}  // namespace

MultiLatentAttention::MultiLatentAttention(ParameterStore& store, const std::string& prefix,
                                           const TransformerConfig& config,
                                           const TensorParallel& tp)
    : tp_(tp),
      heads_local_(divide_over_tp(config.num_attention_heads, tp.size(), "num_attention_heads")),
      kv_lora_rank_(config.kv_lora_rank),
      qk_head_dim_(config.qk_head_dim),
      pos_dim_(config.qk_pos_emb_head_dim),
      v_head_dim_(config.v_head_dim),
      attention_dropout_(config.attention_dropout),
      recompute_core_attention_(config.recomputes("core_attn")),
      rotary_(mla_rotary(config)),
      score_factor_(
          std::pow(yarn_get_mscale(config.rotary_scaling_factor, config.mscale_all_dim), 2)),
      kv_down_(store, prefix + ".linear_kv_down_proj", config.hidden_size,
               ColumnLayout{{config.kv_lora_rank + config.qk_pos_emb_head_dim},
                            ColumnLayout::kReplicated},
               false, tp),
      kv_up_(store, prefix + ".linear_kv_up_proj", config.kv_lora_rank,
             ColumnLayout{{config.num_attention_heads, config.qk_head_dim + config.v_head_dim}, 0},
             false, tp),
      proj_(store, prefix + ".linear_proj", int64_t(config.num_attention_heads) * config.v_head_dim,
            config.hidden_size, config.add_bias_linear, tp) {
  MOE_CHECK(config.multi_latent_attention,
            "MultiLatentAttention needs multi_latent_attention in the config");
  MOE_CHECK(!config.group_query_attention,
            "multi_latent_attention and group_query_attention are mutually exclusive");
  MOE_CHECK(pos_dim_ >= 2 && pos_dim_ % 2 == 0, "qk_pos_emb_head_dim (", pos_dim_,
            ") must be even and >= 2 (rope rotates pairs)");
  ColumnLayout query_heads{{config.num_attention_heads, qk_head_dim_ + pos_dim_}, 0};
  if (config.q_lora_rank > 0) {
    q_down_.emplace(store, prefix + ".linear_q_down_proj", config.hidden_size,
                    ColumnLayout{{config.q_lora_rank}, ColumnLayout::kReplicated}, false, tp);
    if (config.qk_layernorm) {
      q_norm_.emplace(store, prefix + ".q_layernorm", config.q_lora_rank, config.normalization,
                      config.norm_epsilon);
    }
    q_up_.emplace(store, prefix + ".linear_q_up_proj", config.q_lora_rank, query_heads, false, tp);
  } else {
    q_proj_.emplace(store, prefix + ".linear_q_proj", config.hidden_size, query_heads, false, tp);
  }
  if (config.qk_layernorm) {
    kv_norm_.emplace(store, prefix + ".kv_layernorm", config.kv_lora_rank, config.normalization,
                     config.norm_epsilon);
  }
}

Tensor MultiLatentAttention::forward(const ParameterStore& store, const Tensor& x, BatchShape shape,
                                     uint64_t attention_dropout_key, bool training,
                                     Context& ctx) const {
  ctx.input = x;
  ctx.shape = shape;
  ctx.dropout_key = attention_dropout_key;
  int64_t S = shape.seq, B = shape.batch, n = heads_local_, qk = qk_head_dim_, pe = pos_dim_,
          dv = v_head_dim_, q_dim = qk + pe;
  DType compute = x.dtype() == DType::F64 ? DType::F64 : DType::F32;

  // Keys and values: the down projection and its norm on this rank's rows; the normalised
  // latent and the rotary key then enter the tp region together (one gather).
  Tensor combined = kv_down_.forward(store, x);  // [rows_local, kv_lora_rank + pe]
  if (kv_norm_) {
    set_columns(kv_norm_->forward(store, columns(combined, 0, kv_lora_rank_), ctx.kv_norm),
                combined, 0);
  }
  Tensor combined_full = enter_tp_region(combined, tp_);
  MOE_CHECK(combined_full.dim(0) == shape.rows(), "attention input has ", combined_full.dim(0),
            " rows but the micro-batch has seq ", shape.seq, " x batch ", shape.batch);
  ctx.kv_latent = columns(combined_full, 0, kv_lora_rank_);
  Tensor kv_rows = kv_up_.forward(store, ctx.kv_latent).to(compute);  // n x [qk | dv]
  Tensor k_pos_rows = columns(combined_full, kv_lora_rank_, pe).to(compute);

  Tensor q_rows;  // [rows_full, n_local * (qk + pe)]
  if (q_down_) {
    Tensor latent = q_down_->forward(store, x);
    if (q_norm_) latent = q_norm_->forward(store, latent, ctx.q_norm);
    ctx.q_latent = enter_tp_region(latent, tp_);
    q_rows = q_up_->forward(store, ctx.q_latent).to(compute);
  } else {
    q_rows = q_proj_->forward(store, enter_tp_region(x, tp_)).to(compute);
  }

  ctx.q = Tensor::empty({B, n, S, q_dim}, compute);
  move_part(q_rows, ctx.q, {q_dim, 0, 0, qk}, /*to_heads=*/true);
  Tensor q_pos = Tensor::empty({B, n, S, pe}, compute);
  move_part(q_rows, q_pos, {q_dim, qk, 0, pe, /*deinterleave=*/true}, true);
  apply_rotary(q_pos, rotary_, false);
  copy_head_part(q_pos, 0, ctx.q, qk, pe);

  ctx.k = Tensor::empty({B, n, S, q_dim}, compute);
  move_part(kv_rows, ctx.k, {qk + dv, 0, 0, qk}, true);
  Tensor k_pos = Tensor::empty({B, 1, S, pe}, compute);
  move_part(k_pos_rows, k_pos, {pe, 0, 0, pe, /*deinterleave=*/true}, true);
  apply_rotary(k_pos, rotary_, false);
  copy_head_part(k_pos, 0, ctx.k, qk, pe);  // every head shares the rotary key
  ctx.v = Tensor::empty({B, n, S, dv}, compute);
  move_part(kv_rows, ctx.v, {qk + dv, qk, 0, dv}, true);

  // The kernel's 1 / sqrt(head size) is Megatron's 1 / sqrt(qk_head_dim + qk_pos_emb_head_dim);
  // YaRN's m^2 goes into the queries (the saved q is the scaled one).
  if (score_factor_ != 1.0) multiply(ctx.q, score_factor_);
  ctx.attention_dropout = training ? attention_dropout_ : 0.0f;
  ctx.context = core_attention(ctx, x.dtype(), ctx.logsumexp);
  Tensor out = leave_tp_region(proj_.forward_partial(store, ctx.context), tp_);
  proj_.add_bias(store, out);
  if (recompute_core_attention_) ctx.context = ctx.logsumexp = Tensor();  // backward rebuilds
  return out;
}

Tensor MultiLatentAttention::core_attention(const Context& ctx, DType dtype,
                                            Tensor& logsumexp) const {
  const int64_t S = ctx.shape.seq, B = ctx.shape.batch, n = heads_local_, dv = v_head_dim_;
  const DType compute = ctx.q.dtype();
  AttentionDropout dropout{ctx.attention_dropout, ctx.dropout_key, int64_t(tp_.rank()) * n,
                           int64_t(tp_.size()) * n};
  logsumexp = Tensor::empty({B, n, S}, compute);
  Tensor context = Tensor::empty({B, n, S, dv}, compute);
  causal_attention_forward(ctx.q, ctx.k, ctx.v, dropout, logsumexp, context);
  Tensor context_rows = Tensor::empty({S * B, n * dv}, compute);
  move_part(context_rows, context, {dv, 0, 0, dv}, /*to_heads=*/false);
  return context_rows.to(dtype);
}

Tensor MultiLatentAttention::backward(const ParameterStore& store, const Context& ctx,
                                      const Tensor& grad_output) const {
  int64_t S = ctx.shape.seq, B = ctx.shape.batch, n = heads_local_, qk = qk_head_dim_,
          pe = pos_dim_, dv = v_head_dim_, q_dim = qk + pe;
  DType compute = ctx.q.dtype(), activation = ctx.input.dtype();
  Tensor logsumexp = ctx.logsumexp, context = ctx.context;
  if (!context.defined()) context = core_attention(ctx, activation, logsumexp);
  proj_.backward_bias(store, grad_output);
  Tensor dcontext_rows =
      proj_.backward(store, context, leave_tp_region_backward(grad_output, tp_)).to(compute);
  Tensor dcontext = Tensor::empty({B, n, S, dv}, compute);
  move_part(dcontext_rows, dcontext, {dv, 0, 0, dv}, /*to_heads=*/true);
  AttentionDropout dropout{ctx.attention_dropout, ctx.dropout_key, int64_t(tp_.rank()) * n,
                           int64_t(tp_.size()) * n};
  Tensor dq = Tensor::empty(ctx.q.shape(), compute);
  Tensor dk = Tensor::empty(ctx.k.shape(), compute);
  Tensor dv_heads = Tensor::empty(ctx.v.shape(), compute);
  causal_attention_backward(ctx.q, ctx.k, ctx.v, logsumexp, dropout, dcontext, dq, dk, dv_heads);

  if (score_factor_ != 1.0) multiply(dq, score_factor_);
  Tensor dq_rows = Tensor::empty({S * B, n * q_dim}, compute);
  move_part(dq_rows, dq, {q_dim, 0, 0, qk}, /*to_heads=*/false);
  Tensor dq_pos = Tensor::empty({B, n, S, pe}, compute);
  copy_head_part(dq, qk, dq_pos, 0, pe);
  apply_rotary(dq_pos, rotary_, true);
  move_part(dq_rows, dq_pos, {q_dim, qk, 0, pe, /*deinterleave=*/true}, false);

  Tensor dkv_rows = Tensor::empty({S * B, n * (qk + dv)}, compute);
  move_part(dkv_rows, dk, {qk + dv, 0, 0, qk}, false);
  move_part(dkv_rows, dv_heads, {qk + dv, qk, 0, dv}, false);
  Tensor dk_pos = sum_head_part(dk, qk, pe);
  apply_rotary(dk_pos, rotary_, true);
  Tensor dk_pos_rows = Tensor::empty({S * B, pe}, compute);
  move_part(dk_pos_rows, dk_pos, {pe, 0, 0, pe, /*deinterleave=*/true}, false);

  // Keys and values back to this rank's rows: the latent and rotary-key gradients of this
  // rank's heads are summed over tp on the way out of the tp region.
  Tensor dcombined_full = Tensor::empty({S * B, kv_lora_rank_ + pe}, activation);
  set_columns(kv_up_.backward(store, ctx.kv_latent, dkv_rows.to(activation)), dcombined_full, 0);
  set_columns(dk_pos_rows.to(activation), dcombined_full, kv_lora_rank_);
  Tensor dcombined = enter_tp_region_backward(dcombined_full, tp_);
  if (kv_norm_) {
    set_columns(kv_norm_->backward(store, ctx.kv_norm, columns(dcombined, 0, kv_lora_rank_)),
                dcombined, 0);
  }
  Tensor grad_input = kv_down_.backward(store, ctx.input, dcombined);

  Tensor dq_rows_act = dq_rows.to(activation);
  if (q_down_) {
    Tensor dlatent =
        enter_tp_region_backward(q_up_->backward(store, ctx.q_latent, dq_rows_act), tp_);
    if (q_norm_) dlatent = q_norm_->backward(store, ctx.q_norm, dlatent);
    add(grad_input, q_down_->backward(store, ctx.input, dlatent), grad_input);
  } else {
    Tensor input = enter_tp_region(ctx.input, tp_);
    add(grad_input, enter_tp_region_backward(q_proj_->backward(store, input, dq_rows_act), tp_),
        grad_input);
  }
  return grad_input;
}

}  // namespace moe::model
