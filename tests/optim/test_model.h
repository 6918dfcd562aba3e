// Parameter stores shared by the optimizer and checkpoint tests: the one-process layout, spec
// builders and a small model with awkward sizes in both parameter groups.
#pragma once

#include <string>
#include <vector>

#include "moe/comm/parallel_state.h"
#include "moe/tensor/parameters.h"
#include "support/testing.h"

namespace moe::testing {

// The one-process layout (built once per program).
inline const comm::ParallelState& single() {
  static const comm::ParallelState state = comm::single_process_state();
  return state;
}

inline ParamSpec param_spec(std::string name, Shape shape, ParamGroup group = ParamGroup::kDense) {
  ParamSpec spec;
  spec.name = std::move(name);
  spec.shape = std::move(shape);
  spec.group = group;
  return spec;
}
inline ParamSpec without_decay(ParamSpec spec) {
  spec.weight_decay = false;
  return spec;
}
inline ParamSpec tp_duplicate(ParamSpec spec) {
  spec.tensor_parallel_duplicate = true;
  return spec;
}
inline ParamSpec shard_of(ParamSpec spec, Shape global_shape, Shape global_offset) {
  spec.global_shape = std::move(global_shape);
  spec.global_offset = std::move(global_offset);
  return spec;
}

// A TP-duplicated norm, a matrix, a bias, and local experts that are this expert-parallel rank's
// slice of the global expert tensor. Parameters are seeded (experts per ep rank).
struct TestModel {
  ParameterStore store;
  std::vector<ParamHandle> handles;

  TestModel(DType dtype, const comm::ParallelState& p) : store(dtype) {
    int ep = p.sizes.ep, ep_rank = p.ep_group.rank();
    handles.push_back(store.declare(tp_duplicate(without_decay(param_spec("norm.weight", {5})))));
    handles.push_back(store.declare(param_spec("fc.weight", {7, 5})));
    handles.push_back(store.declare(param_spec("fc.bias", {7})));
    handles.push_back(
        store.declare(shard_of(param_spec("experts.fc1", {2, 3, 5}, ParamGroup::kExpert),
                               {2 * ep, 3, 5}, {2 * ep_rank, 0, 0})));
    store.allocate();
    for (size_t i = 0; i < handles.size(); ++i) {
      uint64_t seed = 1000 + i + (i == 3 ? 17 * ep_rank : 0);
      store.param(handles[i]).copy_from(random_normal(store.param(handles[i]).shape(), seed));
    }
  }

  // Different gradients on every rank and step (a data-parallel reduction must average them).
  void fill_grads(int step, int world_rank) {
    store.zero_grads();
    for (size_t i = 0; i < handles.size(); ++i) {
      Tensor g = random_normal(store.grad(handles[i]).shape(), 7919 * step + 31 * world_rank + i);
      store.grad(handles[i]).copy_from(g);
    }
  }
};

}  // namespace moe::testing
