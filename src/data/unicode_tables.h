// Unicode character classes for GPT-2's pre-tokenizer regex, as sorted closed code-point ranges.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moe::data::unicode {

struct CodePointRange {
  uint32_t first;
  uint32_t last;
};

extern const CodePointRange kLetterRanges[];  // general category L*
extern const size_t kLetterRanges_count;
extern const CodePointRange kNumberRanges[];  // general category N*
extern const size_t kNumberRanges_count;

bool is_letter(uint32_t code_point);
bool is_number(uint32_t code_point);
bool is_whitespace(uint32_t code_point);  // the White_Space property

}  // namespace moe::data::unicode
