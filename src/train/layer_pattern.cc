#include "moe/train/layer_pattern.h"

#include <cctype>
#include <cstdint>
#include <string>
#include <utility>

#include "moe/tensor/error.h"

namespace moe::train {
namespace {

using detail::concat;

// Bounds that keep hostile input cheap: no layer count comes near them.
constexpr int64_t kMaxInteger = 2147483647;  // int32 max; sums and products stay in int64
constexpr int64_t kMaxEntries = int64_t{1} << 20;
constexpr int kMaxNesting = 64;  // brackets and parentheses; bounds the parser's recursion

// One list entry and the text position (0-based) of the list element it came from, for messages.
struct Entry {
  int64_t value;
  size_t position;
};

// A Python value of the expression language: an integer or a list of integers.
struct Value {
  bool is_list = false;
  int64_t number = 0;
  std::vector<Entry> entries;  // lists only
};

// Python's grammar restricted to what a layer pattern needs, with Python's precedence:
//   sum     := product ('+' product)*
//   product := atom ('*' atom)*
//   atom    := integer | '[' [sum (',' sum)* [',']] ']' | '(' sum ')'
class Parser {
 public:
  Parser(std::string_view flag, std::string_view text) : flag_(flag), text_(text) {}

  Value parse_all() {
    Value value = sum();
    skip_spaces();
    if (at_ < text_.size()) fail(at_, concat("expected '+', '*' or the end, found ", found()));
    return value;
  }

  [[noreturn]] void fail(size_t position, const std::string& why) const {
    throw Error(concat(flag_, " '", text_, "': at character ", position + 1, ": ", why));
  }
  [[noreturn]] void fail(const std::string& why) const {
    throw Error(concat(flag_, " '", text_, "': ", why));
  }

 private:
  Value sum() {
    Value left = product();
    while (consume('+')) {
      const size_t op = at_ - 1;
      left = add(std::move(left), product(), op);
    }
    return left;
  }

  Value product() {
    Value left = atom();
    while (consume('*')) {
      const size_t op = at_ - 1;
      left = multiply(std::move(left), atom(), op);
    }
    return left;
  }

  Value atom() {
    skip_spaces();
    const size_t start = at_;
    if (at_ < text_.size() && std::isdigit(static_cast<unsigned char>(text_[at_]))) {
      return integer();
    }
    if (consume('[')) return list(start);
    if (consume('(')) {
      enter(start);
      Value inner = sum();
      if (!consume(')'))
        fail(at_,
             concat("expected ')' closing the '(' at character ", start + 1, ", found ", found()));
      --depth_;
      return inner;
    }
    if (at_ < text_.size() && text_[at_] == '-') fail(at_, "negative numbers are not allowed");
    if (at_ < text_.size() && is_name_start(text_[at_])) {
      fail(at_, concat("expected an integer, '[' or '(', found ", found(),
                       ": a name or a call is not allowed (the expression is evaluated, never "
                       "run)"));
    }
    fail(at_, concat("expected an integer, '[' or '(', found ", found()));
  }

  Value integer() {
    const size_t start = at_;
    int64_t number = 0;
    while (at_ < text_.size() && std::isdigit(static_cast<unsigned char>(text_[at_]))) {
      number = number * 10 + (text_[at_++] - '0');
      if (number > kMaxInteger) fail(start, concat("the integer is larger than ", kMaxInteger));
    }
    Value value;
    value.number = number;
    return value;
  }

  Value list(size_t open) {
    enter(open);
    Value value;
    value.is_list = true;
    if (!consume(']')) {
      while (true) {
        skip_spaces();
        const size_t element_start = at_;
        Value element = sum();
        if (element.is_list) {
          fail(element_start, "a list inside a list is not allowed (entries are 0 or 1)");
        }
        value.entries.push_back({element.number, element_start});
        if (consume(']')) break;
        if (!consume(',')) fail(at_, concat("expected ',' or ']', found ", found()));
        if (consume(']')) break;  // Python allows a trailing comma
      }
    }
    --depth_;
    return value;
  }

  Value add(Value left, Value right, size_t op) const {
    if (left.is_list != right.is_list) fail(op, "cannot add a list and an integer");
    if (!left.is_list) {
      left.number = checked_integer(left.number + right.number, op);
      return left;
    }
    check_size(int64_t(left.entries.size()) + int64_t(right.entries.size()), op);
    left.entries.insert(left.entries.end(), right.entries.begin(), right.entries.end());
    return left;
  }

  // Python's repetition: list * n and n * list; integers multiply.
  Value multiply(Value left, Value right, size_t op) const {
    if (left.is_list && right.is_list) fail(op, "cannot multiply two lists");
    if (!left.is_list && !right.is_list) {
      left.number = checked_integer(left.number * right.number, op);
      return left;
    }
    Value& repeated = left.is_list ? left : right;
    const int64_t count = left.is_list ? right.number : left.number;
    const int64_t length = int64_t(repeated.entries.size());
    if (length > 0 && count > kMaxEntries / length) {
      fail(op, concat("repeating a list of ", length, " entries ", count,
                      " times exceeds the limit of ", kMaxEntries, " entries"));
    }
    Value result;
    result.is_list = true;
    result.entries.reserve(size_t(length * count));
    for (int64_t r = 0; r < count; ++r) {
      result.entries.insert(result.entries.end(), repeated.entries.begin(), repeated.entries.end());
    }
    return result;
  }

  // Operands are at most kMaxInteger, so sums and products fit in int64 before this check.
  int64_t checked_integer(int64_t value, size_t op) const {
    if (value > kMaxInteger) fail(op, concat("the result is larger than ", kMaxInteger));
    return value;
  }

  void check_size(int64_t entries, size_t op) const {
    if (entries > kMaxEntries) {
      fail(op, concat("the list would have ", entries, " entries, more than the limit of ",
                      kMaxEntries));
    }
  }

  void enter(size_t open) {
    if (++depth_ > kMaxNesting) {
      fail(open, concat("brackets and parentheses nest deeper than ", kMaxNesting, " levels"));
    }
  }

  static bool is_name_start(char c) {
    return std::isalpha(static_cast<unsigned char>(c)) || c == '_';
  }

  void skip_spaces() {
    while (at_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[at_]))) ++at_;
  }

  bool consume(char c) {
    skip_spaces();
    if (at_ < text_.size() && text_[at_] == c) {
      ++at_;
      return true;
    }
    return false;
  }

  // What stands at the cursor, for "expected X, found Y".
  std::string found() const {
    if (at_ >= text_.size()) return "the end of the text";
    if (is_name_start(text_[at_])) {
      size_t end = at_;
      while (end < text_.size() &&
             (is_name_start(text_[end]) || std::isdigit(static_cast<unsigned char>(text_[end])))) {
        ++end;
      }
      return concat("the name '", text_.substr(at_, end - at_), "'");
    }
    return concat("'", text_[at_], "'");
  }

  std::string_view flag_, text_;
  size_t at_ = 0;
  int depth_ = 0;
};

}  // namespace

std::vector<bool> layer_pattern(std::string_view flag, std::string_view text, int num_layers) {
  MOE_CHECK(num_layers >= 1, flag, ": the number of layers must be positive (got ", num_layers,
            ")");
  Parser parser(flag, text);
  const Value value = parser.parse_all();
  std::vector<bool> pattern;
  if (!value.is_list) {
    if (value.number < 1) {
      parser.fail(concat("the frequency ", value.number,
                         " must be at least 1 (layer i is selected when i % N == 0)"));
    }
    for (int layer = 0; layer < num_layers; ++layer) pattern.push_back(layer % value.number == 0);
    return pattern;
  }
  if (value.entries.empty())
    parser.fail(
        "the pattern is an empty list (expected one 0/1 entry "
        "per layer)");
  for (size_t i = 0; i < value.entries.size(); ++i) {
    const Entry& entry = value.entries[i];
    if (entry.value != 0 && entry.value != 1) {
      parser.fail(entry.position, concat("the entry for layer ", i, " is ", entry.value,
                                         "; entries must be 0 or 1"));
    }
    pattern.push_back(entry.value == 1);
  }
  if (int64_t(pattern.size()) != num_layers) {
    parser.fail(concat("the pattern has ", pattern.size(), " entries but --num-layers is ",
                       num_layers, " (one 0/1 entry per layer)"));
  }
  return pattern;
}

}  // namespace moe::train
