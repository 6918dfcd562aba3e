// Errors raised at the API boundary. Every check names the values it compared, so a user who
// passes a bad shape, flag or file reads what was wrong without opening a debugger.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace moe {

// The one exception type the library throws for bad input or broken invariants.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

namespace detail {
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}
}  // namespace detail

}  // namespace moe

// MOE_CHECK(condition, message parts...): throws moe::Error with the parts streamed together.
#define MOE_CHECK(condition, ...)                                             \
  do {                                                                        \
    if (!(condition)) throw ::moe::Error(::moe::detail::concat(__VA_ARGS__)); \
  } while (0)
