// Helpers for the data tests: running a command with its output captured, and the Python
// cross-check interpreter and script.
#pragma once

#include <sys/wait.h>

#include <cstdio>
#include <string>

namespace moe::data::testing {

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

inline CommandResult run_command(const std::string& command) {
  CommandResult result;
  std::FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  size_t count;
  while ((count = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0)
    result.output.append(buffer, count);
  const int status = ::pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

inline std::string megatron_format_script() {
  return std::string(MOE_DATA_TEST_DIR) + "/megatron_format.py";
}

}  // namespace moe::data::testing
