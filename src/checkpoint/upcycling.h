// Upcycling's tensor transforms (checkpoint.h's Upcycling describes them), used by
// load_checkpoint. Private to src/checkpoint.
#pragma once

#include <string>

#include "moe/checkpoint/checkpoint.h"

namespace moe::checkpoint::upcycling {

// Where an MoE model's parameter comes from when a dense checkpoint is upcycled.
struct UpcycledSource {
  enum Kind {
    kSameName,         // the dense checkpoint's tensor of the same name
    kKeepInitialised,  // not in a dense model (shared experts, router bias): keeps its init
    kRouter,           // the router weight: its initial columns repeated per granularity group
    kExpert,           // sliced from the layer's dense MLP tensor `dense_name`
  } kind = kSameName;
  std::string dense_name;
  int ffn_axis = -1;    // kExpert: the dense tensor's ffn axis (-1: none, the fc2 bias)
  bool scaled = false;  // kExpert: multiplied by the weight scale (all but the fc2 bias)
};
UpcycledSource upcycled_source(const std::string& name);

// This rank's box (spec) of expert tensor `spec.name` from the whole dense tensor `dense` [F64].
// Throws naming --moe-upcycling-granularity when the shapes do not fit.
void fill_expert_from_dense(const ParamSpec& spec, const Tensor& dense,
                            const UpcycledSource& source, const Upcycling& upcycling, Tensor param);
// The router weight [H, E] (whole on every rank): column e becomes column e / granularity.
void repeat_router_columns(const ParamSpec& spec, const Upcycling& upcycling, Tensor param);

}  // namespace moe::checkpoint::upcycling
