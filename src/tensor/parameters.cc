#include "moe/tensor/parameters.h"

namespace moe {

namespace {
int group_index(ParamGroup group) {
  return int(group);
}

// One parameter's elements [begin, begin + numel(shape)) of a group's flat buffer, viewed in its
// local shape.
Tensor view_in(const Tensor& flat, int64_t begin, const Shape& shape) {
  return flat.rows(begin, begin + shape_numel(shape)).reshape(shape);
}
}  // namespace

ParameterStore::ParameterStore(DType param_dtype, DType grad_dtype)
    : param_dtype_(param_dtype), grad_dtype_(grad_dtype) {
  MOE_CHECK(grad_dtype == DType::F32 || (grad_dtype == DType::F64 && param_dtype == DType::F64),
            "ParameterStore: gradient dtype ", dtype_name(grad_dtype), " with parameter dtype ",
            dtype_name(param_dtype), " (gradients are fp32, or fp64 for fp64 parameters)");
}

ParamHandle ParameterStore::declare(ParamSpec spec) {
  MOE_CHECK(!allocated_, "parameter '", spec.name, "' declared after the store was allocated");
  MOE_CHECK(!spec.name.empty(), "a parameter needs a name");
  MOE_CHECK(find(spec.name).index < 0, "parameter '", spec.name, "' declared twice");
  if (spec.global_shape.empty()) spec.global_shape = spec.shape;
  if (spec.global_offset.empty()) spec.global_offset = Shape(spec.shape.size(), 0);
  MOE_CHECK(spec.global_shape.size() == spec.shape.size() &&
                spec.global_offset.size() == spec.shape.size(),
            "parameter '", spec.name, "': local shape ", shape_string(spec.shape),
            ", global shape ", shape_string(spec.global_shape), " and offset ",
            shape_string(spec.global_offset), " must have the same rank");
  for (size_t d = 0; d < spec.shape.size(); ++d) {
    MOE_CHECK(
        spec.global_offset[d] >= 0 && spec.global_offset[d] + spec.shape[d] <= spec.global_shape[d],
        "parameter '", spec.name, "': local shape ", shape_string(spec.shape), " at offset ",
        shape_string(spec.global_offset), " does not fit global shape ",
        shape_string(spec.global_shape));
  }
  int64_t& size = spec.trainable ? group_sizes_[group_index(spec.group)] : buffers_size_;
  offsets_.push_back(size);
  size += shape_numel(spec.shape);
  specs_.push_back(std::move(spec));
  return ParamHandle{int(specs_.size()) - 1};
}

void ParameterStore::allocate() {
  MOE_CHECK(!allocated_, "ParameterStore::allocate called twice");
  for (int g = 0; g < kParamGroupCount; ++g) {
    params_[g] = Tensor({group_sizes_[g]}, param_dtype_);
    grads_[g] = Tensor({group_sizes_[g]}, grad_dtype_);
  }
  buffers_ = Tensor({buffers_size_}, DType::F32);
  allocated_ = true;
}

const ParamSpec& ParameterStore::spec(ParamHandle handle) const {
  MOE_CHECK(handle.index >= 0 && handle.index < count(), "invalid parameter handle ", handle.index,
            " (store has ", count(), " parameters)");
  return specs_[handle.index];
}

int64_t ParameterStore::offset(ParamHandle handle) const {
  spec(handle);
  return offsets_[handle.index];
}

Tensor ParameterStore::param(ParamHandle handle) const {
  const ParamSpec& s = spec(handle);
  MOE_CHECK(allocated_, "parameter '", s.name, "' read before the store was allocated");
  const Tensor& flat = s.trainable ? params_[group_index(s.group)] : buffers_;
  return view_in(flat, offsets_[handle.index], s.shape);
}

Tensor ParameterStore::grad(ParamHandle handle) const {
  const ParamSpec& s = spec(handle);
  MOE_CHECK(allocated_, "gradient of '", s.name, "' read before the store was allocated");
  MOE_CHECK(s.trainable, "'", s.name,
            "' is a persistent buffer, not trainable: it has no gradient");
  return view_in(grads_[group_index(s.group)], offsets_[handle.index], s.shape);
}

ParamHandle ParameterStore::find(const std::string& name) const {
  for (int i = 0; i < count(); ++i) {
    if (specs_[i].name == name) return ParamHandle{i};
  }
  return ParamHandle{-1};
}

Tensor ParameterStore::flat_params(ParamGroup group) const {
  MOE_CHECK(allocated_, "flat_params before allocate()");
  return params_[group_index(group)];
}

Tensor ParameterStore::flat_grads(ParamGroup group) const {
  MOE_CHECK(allocated_, "flat_grads before allocate()");
  return grads_[group_index(group)];
}

void ParameterStore::zero_grads() {
  for (Tensor& g : grads_) g.zero();
}

}  // namespace moe
