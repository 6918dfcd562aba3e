// Runs a Python reference script under Debian's /usr/bin/python3 (with python3-torch) on a JSON
// input and returns its JSON output, for tests that compare against PyTorch.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "moe/tensor/tensor.h"

namespace moe::testing {

// The tensor's values as a JSON array of doubles (exact for every floating dtype).
inline nlohmann::json json_values(const Tensor& tensor) {
  Tensor wide = tensor.to(DType::F64);
  return std::vector<double>(wide.data<double>(), wide.data<double>() + wide.numel());
}

// script INPUT.json OUTPUT.json; a failed run fails the calling test and returns null.
inline nlohmann::json run_torch_reference(const std::string& script, const nlohmann::json& input) {
  auto dir = std::filesystem::temp_directory_path();
  std::string stem = "moe_torch_ref_" + std::to_string(::getpid());
  std::filesystem::path in_path = dir / (stem + "_in.json"), out_path = dir / (stem + "_out.json");
  std::ofstream(in_path) << input.dump();
  std::string command =
      "/usr/bin/python3 " + script + " " + in_path.string() + " " + out_path.string();
  int status = std::system(command.c_str());
  nlohmann::json output;
  if (status == 0) std::ifstream(out_path) >> output;
  std::filesystem::remove(in_path);
  std::filesystem::remove(out_path);
  EXPECT_EQ(status, 0) << command;
  return output;
}

}  // namespace moe::testing
