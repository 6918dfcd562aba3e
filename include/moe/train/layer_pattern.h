// Megatron's per-layer pattern flags (--moe-layer-freq): a plain integer N or a Python-style list
// expression, evaluated by a small recursive-descent parser that never runs code.
#pragma once

#include <string_view>
#include <vector>

namespace moe::train {

// Evaluates `text`, the value of `flag`, for a model of `num_layers` layers (one bool per layer,
// true = the layer is of the pattern's kind, e.g. MoE). Accepted forms, as Python evaluates them:
//   N                      layer i is true when i % N == 0 (N >= 1)
//   [1,0,1]                one 0/1 entry per layer
//   [0]*3+[1]*58, 2*[1,0]  list repetition (either side) and concatenation
//   ([1]*3+[0])*8          parentheses; integers may be added and multiplied too
// Anything else (names, calls, strings, negative numbers, trailing text) is refused, as are a list
// whose length is not num_layers, entries other than 0/1, an empty list and sizes beyond a bound.
// Throws moe::Error naming the flag, the text, the character position and what was expected.
std::vector<bool> layer_pattern(std::string_view flag, std::string_view text, int num_layers);

}  // namespace moe::train
