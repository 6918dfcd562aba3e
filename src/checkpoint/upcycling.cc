#include "upcycling.h"

#include <cmath>
#include <vector>

namespace moe::checkpoint::upcycling {

namespace {

bool ends_with(const std::string& name, const std::string& suffix) {
  return name.size() >= suffix.size() &&
         name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Megatron's _get_weight_scale: the factor on each expert's fc1 and fc2 that makes the weighted
// sum of the selected experts' outputs match the dense MLP's scale (exactly so only where the
// activation is homogeneous, see docs/moe-train.md).
double weight_scale(const Upcycling& u) {
  const double activation_scale =
      u.pre_softmax ? double(u.num_experts) * u.granularity / u.topk : double(u.granularity);
  return u.swiglu ? std::cbrt(activation_scale) : std::sqrt(activation_scale);
}

}  // namespace

UpcycledSource upcycled_source(const std::string& name) {
  struct ExpertTensor {
    const char* suffix;
    const char* dense_suffix;
    int ffn_axis;  // of the dense tensor; -1: the last axis when scaled, none otherwise
    bool scaled;
  };
  static const ExpertTensor expert_tensors[] = {
      {".mlp.experts.linear_fc1.weight", ".mlp.linear_fc1.weight", -1, true},
      {".mlp.experts.linear_fc1.bias", ".mlp.linear_fc1.bias", -1, true},
      {".mlp.experts.linear_fc2.weight", ".mlp.linear_fc2.weight", 0, true},
      {".mlp.experts.linear_fc2.bias", ".mlp.linear_fc2.bias", -1, false},
  };
  UpcycledSource source;
  for (const ExpertTensor& t : expert_tensors) {
    if (!ends_with(name, t.suffix)) continue;
    source.kind = UpcycledSource::kExpert;
    source.dense_name = name.substr(0, name.size() - std::string(t.suffix).size()) + t.dense_suffix;
    source.ffn_axis = t.ffn_axis;
    source.scaled = t.scaled;
    return source;
  }
  if (ends_with(name, ".mlp.router.weight")) {
    source.kind = UpcycledSource::kRouter;
  } else if (name.find(".mlp.router.") != std::string::npos ||
             name.find(".mlp.shared_experts.") != std::string::npos) {
    source.kind = UpcycledSource::kKeepInitialised;
  }
  return source;
}

void fill_expert_from_dense(const ParamSpec& spec, const Tensor& dense,
                            const UpcycledSource& source, const Upcycling& upcycling,
                            Tensor param) {
  const Shape& global = spec.global_shape;
  const Shape& dense_shape = dense.shape();
  const int rank = int(dense_shape.size());
  const int ffn_axis = source.ffn_axis < 0 && source.scaled ? rank - 1 : source.ffn_axis;
  const int64_t granularity = upcycling.granularity;
  Shape expected(global.begin() + 1, global.end());
  if (ffn_axis >= 0 && ffn_axis < rank) expected[size_t(ffn_axis)] *= granularity;
  MOE_CHECK(dense_shape == expected, "--moe-use-upcycling: the dense checkpoint's '",
            source.dense_name, "' is ", shape_string(dense_shape), " but experts ",
            shape_string(global), " of '", spec.name, "' with --moe-upcycling-granularity ",
            granularity, " need it ", shape_string(expected),
            " (granularity x the expert ffn size must be the dense ffn size)");
  const int64_t expert_ffn = ffn_axis >= 0 ? global[size_t(ffn_axis) + 1] : 0;
  const double scale = source.scaled ? weight_scale(upcycling) : 1.0;

  // Row-major strides of the dense tensor.
  std::vector<int64_t> stride(size_t(rank), 1);
  for (int axis = rank - 2; axis >= 0; --axis) {
    stride[size_t(axis)] = stride[size_t(axis) + 1] * dense_shape[size_t(axis) + 1];
  }
  // Each run along the last axis is contiguous in both tensors.
  const Shape& local = spec.shape;
  const int64_t run = local.back();
  const int64_t runs = shape_numel(local) / run;
  Tensor out(local, DType::F64);
  const double* from = dense.data<double>();
  double* to = out.data<double>();
  std::vector<int64_t> index(local.size(), 0);  // the local index of the run's first element
  for (int64_t r = 0; r < runs; ++r) {
    int64_t rest = r;
    for (size_t axis = local.size() - 1; axis-- > 0;) {
      index[axis] = rest % local[axis];
      rest /= local[axis];
    }
    const int64_t expert = spec.global_offset[0] + index[0];
    const int64_t granule = expert % granularity;
    int64_t dense_at = 0;
    for (int axis = 0; axis < rank; ++axis) {
      const size_t global_axis = size_t(axis) + 1;
      int64_t at = spec.global_offset[global_axis] +
                   (global_axis + 1 < local.size() ? index[global_axis] : 0);
      if (axis == ffn_axis) at += granule * expert_ffn;
      dense_at += at * stride[size_t(axis)];
    }
    for (int64_t i = 0; i < run; ++i) to[r * run + i] = scale * from[dense_at + i];
  }
  param.copy_from(out);
}

void repeat_router_columns(const ParamSpec& spec, const Upcycling& upcycling, Tensor param) {
  MOE_CHECK(spec.shape == spec.global_shape && spec.shape.size() == 2,
            "--moe-use-upcycling: the router weight '", spec.name,
            "' must be whole [hidden, experts] on every rank, got local ", shape_string(spec.shape),
            " of ", shape_string(spec.global_shape));
  const int64_t hidden = spec.shape[0], experts = spec.shape[1];
  Tensor initial = param.to(DType::F64);
  Tensor repeated(spec.shape, DType::F64);
  for (int64_t h = 0; h < hidden; ++h) {
    for (int64_t e = 0; e < experts; ++e) {
      repeated.data<double>()[h * experts + e] =
          initial.data<double>()[h * experts + e / upcycling.granularity];
    }
  }
  param.copy_from(repeated);
}

}  // namespace moe::checkpoint::upcycling
