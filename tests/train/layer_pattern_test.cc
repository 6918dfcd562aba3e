// --moe-layer-freq's expression language: Megatron's list expressions evaluated as Python would,
// and every malformed or hostile input refused with the flag, the text and the position.
#include "moe/train/layer_pattern.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "support/testing.h"

namespace moe::train {
namespace {

using Pattern = std::vector<bool>;

Pattern pattern(const std::string& text, int num_layers) {
  return layer_pattern("--moe-layer-freq", text, num_layers);
}

std::string error(const std::string& text, int num_layers) {
  return moe::testing::error_text([&] { pattern(text, num_layers); });
}

// The pattern Python gives for `count` copies of `unit`.
Pattern repeated(const Pattern& unit, int count) {
  Pattern out;
  for (int i = 0; i < count; ++i) out.insert(out.end(), unit.begin(), unit.end());
  return out;
}

TEST(LayerPattern, PlainIntegerIsEveryNthLayer) {
  EXPECT_EQ(pattern("1", 3), (Pattern{true, true, true}));
  EXPECT_EQ(pattern("2", 5), (Pattern{true, false, true, false, true}));
  EXPECT_EQ(pattern("3", 4), (Pattern{true, false, false, true}));
  EXPECT_EQ(pattern("7", 2), (Pattern{true, false}));  // larger than the model: layer 0 only
  EXPECT_EQ(pattern(" 2 ", 2), (Pattern{true, false}));
}

TEST(LayerPattern, ListForms) {
  EXPECT_EQ(pattern("[1,0,1]", 3), (Pattern{true, false, true}));
  EXPECT_EQ(pattern("[ 1 , 0 , 1 , ]", 3), (Pattern{true, false, true}));  // Python's comma
  EXPECT_EQ(pattern("[1,0]*2", 4), (Pattern{true, false, true, false}));
  EXPECT_EQ(pattern("2*[0,1]", 4), (Pattern{false, true, false, true}));
  EXPECT_EQ(pattern("[0]+[1]*3", 4), (Pattern{false, true, true, true}));
  EXPECT_EQ(pattern("[1]*0+[0,1]", 2), (Pattern{false, true}));     // repetition by 0 is empty
  EXPECT_EQ(pattern("[]+[1]+[]", 1), (Pattern{true}));              // empty parts are fine
  EXPECT_EQ(pattern("[1]*(1+2)", 3), (Pattern{true, true, true}));  // integers add and multiply
  EXPECT_EQ(pattern("[1]*2*3", 6), Pattern(6, true));               // left to right
}

TEST(LayerPattern, DeepSeekFirstThreeDense) {
  Pattern expected(61, true);
  expected[0] = expected[1] = expected[2] = false;
  EXPECT_EQ(pattern("[0]*3+[1]*58", 61), expected);
  EXPECT_EQ(pattern("[0]*3 + [1]*58", 61), expected);
}

TEST(LayerPattern, ParenthesesNest) {
  // Megatron's help: three expert layers, one dense, eight times.
  EXPECT_EQ(pattern("([1]*3+[0])*8", 32), repeated({true, true, true, false}, 8));
  EXPECT_EQ(pattern("(([1]*3+[0]*2)*2)", 10), repeated({true, true, true, false, false}, 2));
  EXPECT_EQ(pattern("(([0]+([1]*2))*2+[0])*2", 14),
            repeated({false, true, true, false, true, true, false}, 2));
  EXPECT_EQ(pattern("[(1)]*(((2)))", 2), (Pattern{true, true}));
}

TEST(LayerPattern, NamesAndCallsAreRefused) {
  EXPECT_EQ(error("__import__('os').system('x')", 4),
            "--moe-layer-freq '__import__('os').system('x')': at character 1: expected an "
            "integer, '[' or '(', found the name '__import__': a name or a call is not allowed "
            "(the expression is evaluated, never run)");
  EXPECT_EQ(error("[0]*n_dense+[1]*3", 4),
            "--moe-layer-freq '[0]*n_dense+[1]*3': at character 5: expected an integer, '[' or "
            "'(', found the name 'n_dense': a name or a call is not allowed (the expression is "
            "evaluated, never run)");
  // A call after a value is trailing text.
  EXPECT_EQ(error("[1]*2(3)", 2),
            "--moe-layer-freq '[1]*2(3)': at character 6: expected '+', '*' or the end, found "
            "'('");
  EXPECT_EQ(error("[1,0].copy()", 2),
            "--moe-layer-freq '[1,0].copy()': at character 6: expected '+', '*' or the end, "
            "found '.'");
}

TEST(LayerPattern, MalformedTextNamesThePosition) {
  EXPECT_EQ(error("[0]*3+[1]*58 junk", 61),
            "--moe-layer-freq '[0]*3+[1]*58 junk': at character 14: expected '+', '*' or the "
            "end, found the name 'junk'");
  EXPECT_EQ(error("[1,0", 2),
            "--moe-layer-freq '[1,0': at character 5: expected ',' or ']', found the end of the "
            "text");
  EXPECT_EQ(error("([1]*2", 2),
            "--moe-layer-freq '([1]*2': at character 7: expected ')' closing the '(' at "
            "character 1, found the end of the text");
  EXPECT_EQ(error("[1]*", 1),
            "--moe-layer-freq '[1]*': at character 5: expected an integer, '[' or '(', found the "
            "end of the text");
  EXPECT_EQ(error("", 1),
            "--moe-layer-freq '': at character 1: expected an integer, '[' or '(', found the end "
            "of the text");
  EXPECT_EQ(error("[1,,0]", 2),
            "--moe-layer-freq '[1,,0]': at character 4: expected an integer, '[' or '(', found "
            "','");
  EXPECT_EQ(error("[1.5]", 1),
            "--moe-layer-freq '[1.5]': at character 3: expected ',' or ']', found '.'");
  EXPECT_EQ(error("\"[1]\"", 1),
            "--moe-layer-freq '\"[1]\"': at character 1: expected an integer, '[' or '(', found "
            "'\"'");
}

TEST(LayerPattern, TypeErrorsAsPythonRaisesThem) {
  EXPECT_EQ(error("[1]+1", 1),
            "--moe-layer-freq '[1]+1': at character 4: cannot add a list and an integer");
  EXPECT_EQ(error("[1]*[2]", 1),
            "--moe-layer-freq '[1]*[2]': at character 4: cannot multiply two lists");
  EXPECT_EQ(error("[[1],[0]]", 2),
            "--moe-layer-freq '[[1],[0]]': at character 2: a list inside a list is not allowed "
            "(entries are 0 or 1)");
}

TEST(LayerPattern, EntriesMustBeZeroOrOne) {
  EXPECT_EQ(error("[1,2]", 2),
            "--moe-layer-freq '[1,2]': at character 4: the entry for layer 1 is 2; entries must "
            "be 0 or 1");
  // The position is the element's, also when it was repeated.
  EXPECT_EQ(error("[0]*3+[1,5]*2", 7),
            "--moe-layer-freq '[0]*3+[1,5]*2': at character 10: the entry for layer 4 is 5; "
            "entries must be 0 or 1");
  EXPECT_EQ(error("[1+1]", 1),
            "--moe-layer-freq '[1+1]': at character 2: the entry for layer 0 is 2; entries must "
            "be 0 or 1");
}

TEST(LayerPattern, LengthMustMatchTheLayers) {
  EXPECT_EQ(error("[1,0,1]", 2),
            "--moe-layer-freq '[1,0,1]': the pattern has 3 entries but --num-layers is 2 (one "
            "0/1 entry per layer)");
  EXPECT_EQ(error("[0]*3+[1]*58", 60),
            "--moe-layer-freq '[0]*3+[1]*58': the pattern has 61 entries but --num-layers is 60 "
            "(one 0/1 entry per layer)");
  EXPECT_EQ(error("[]", 2),
            "--moe-layer-freq '[]': the pattern is an empty list (expected one 0/1 entry per "
            "layer)");
  EXPECT_EQ(error("[1]*0", 2),
            "--moe-layer-freq '[1]*0': the pattern is an empty list (expected one 0/1 entry per "
            "layer)");
}

TEST(LayerPattern, FrequencyMustBePositive) {
  EXPECT_EQ(error("0", 2),
            "--moe-layer-freq '0': the frequency 0 must be at least 1 (layer i is selected when "
            "i % N == 0)");
  EXPECT_EQ(error("-1", 2),
            "--moe-layer-freq '-1': at character 1: negative numbers are not allowed");
  EXPECT_EQ(error("[1]*-2", 2),
            "--moe-layer-freq '[1]*-2': at character 5: negative numbers are not allowed");
}

TEST(LayerPattern, SizesAreBounded) {
  // Hostile sizes are refused before any memory is taken.
  EXPECT_EQ(error("[1]*99999999999", 2),
            "--moe-layer-freq '[1]*99999999999': at character 5: the integer is larger than "
            "2147483647");
  EXPECT_EQ(error("[1,0]*1000000", 2),
            "--moe-layer-freq '[1,0]*1000000': at character 6: repeating a list of 2 entries "
            "1000000 times exceeds the limit of 1048576 entries");
  EXPECT_EQ(error("[1]*65536*65536", 2),
            "--moe-layer-freq '[1]*65536*65536': at character 10: repeating a list of 65536 "
            "entries 65536 times exceeds the limit of 1048576 entries");
  EXPECT_EQ(error("[1]*(65536*65536)", 2),
            "--moe-layer-freq '[1]*(65536*65536)': at character 11: the result is larger than "
            "2147483647");
  EXPECT_EQ(error("[1]*1048576+[0]", 2),
            "--moe-layer-freq '[1]*1048576+[0]': at character 12: the list would have 1048577 "
            "entries, more than the limit of 1048576");
  // Deep nesting is refused instead of exhausting the stack.
  const std::string deep = std::string(100, '(') + "1" + std::string(100, ')');
  EXPECT_EQ(error(deep, 1), "--moe-layer-freq '" + deep +
                                "': at character 65: brackets and parentheses nest deeper than "
                                "64 levels");
}

TEST(LayerPattern, FlagNameIsTheCallers) {
  EXPECT_EQ(moe::testing::error_text([] { layer_pattern("--window-attn-skip-freq", "x", 2); }),
            "--window-attn-skip-freq 'x': at character 1: expected an integer, '[' or '(', found "
            "the name 'x': a name or a call is not allowed (the expression is evaluated, never "
            "run)");
}

}  // namespace
}  // namespace moe::train
