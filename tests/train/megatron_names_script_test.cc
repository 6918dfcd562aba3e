// scripts/megatron_argument_names.py, which generates src/train/megatron_argument_names.cc, on a
// small Megatron-LM-shaped tree: add_argument option strings, and the names
// megatron/training/argument_utils.py's ArgumentGroupFactory gives dataclass fields (bool
// defaults, argparse_meta renames, init=False, exclusions, inherited and overridden fields).
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <regex>
#include <string>
#include <vector>

#include "support/testing.h"

namespace {

namespace fs = std::filesystem;
using moe::testing::read_bytes;
using moe::testing::ScratchDir;
using moe::testing::write_bytes;

constexpr const char* kConfigPy = R"(from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional


@dataclass
class BaseConfig:
    base_size: int = 1
    overridden_flag: bool = True


@dataclass
class ModelConfig(BaseConfig):
    num_layers: int = 0
    use_thing: bool = False
    fuse_thing: bool = True
    maybe_thing: Optional[bool] = None
    maybe_too: bool | None = False
    overridden_flag: bool = False
    renamed: int = field(default=3, metadata={"argparse_meta": {"arg_names": ["--other-name"],
                                                                "type": int}})
    derived: int = field(init=False, default=0)
    skipped_field: int = 2
    kind: Literal["a", "b"] = "a"
    counter: ClassVar[int] = 0


@dataclass
class TrainConfig:
    train_iters: Optional[int] = None
)";

constexpr const char* kArgumentsPy = R"(from megatron.core.config import ModelConfig


def _add_model_args(parser):
    exclude = ["skipped_field"]
    ArgumentGroupFactory(ModelConfig, exclude=exclude).build_group(parser, "model")
    group = parser.add_argument_group(title="x")
    group.add_argument('--plain', type=int)
    group.add_argument('--alias-one', '--alias-two', '-a', action='store_true')
    if HAVE_SOMETHING:
        group.add_argument('--conditional')
    return parser


def _add_training_args(parser):
    from megatron.training.config import TrainConfig
    ArgumentGroupFactory(TrainConfig).build_group(parser, "training")
)";

struct ScriptRun {
  int status;
  std::string output;  // the generated .cc
  std::string errors;  // stderr
};

ScriptRun run_script(const ScratchDir& dir, const std::string& arguments_py) {
  const fs::path megatron = dir.path / "megatron";
  fs::create_directories(megatron / "training");
  fs::create_directories(megatron / "core");
  write_bytes(megatron / "core" / "config.py", kConfigPy);
  write_bytes(megatron / "training" / "config.py",
              "from dataclasses import dataclass\n\n\n@dataclass\nclass Unused:\n    x: int = 0\n");
  write_bytes(megatron / "training" / "arguments.py", arguments_py);
  const std::string command = "python3 " MOE_MEGATRON_NAMES_SCRIPT " " +
                              (megatron / "training" / "arguments.py").string() +
                              " --release test_v1 --commit abc -o " + dir.file("names.cc") +
                              " 2> " + dir.file("stderr.txt");
  const int status = std::system(command.c_str());
  return {status, read_bytes(dir.file("names.cc")), read_bytes(dir.file("stderr.txt"))};
}

std::vector<std::string> names_in(const std::string& source) {
  std::vector<std::string> names;
  const std::regex entry(R"re(\n      "(--[a-z0-9-]+)",)re");
  for (auto it = std::sregex_iterator(source.begin(), source.end(), entry);
       it != std::sregex_iterator(); ++it) {
    names.push_back((*it)[1]);
  }
  return names;
}

TEST(MegatronNamesScript, NamesArgumentsAndDataclassFieldsAsMegatronDoes) {
  ScratchDir dir("megatron_names");
  const ScriptRun run = run_script(dir, kArgumentsPy);
  ASSERT_EQ(run.status, 0) << run.errors;
  EXPECT_EQ(names_in(run.output),
            (std::vector<std::string>{
                "--alias-one", "--alias-two",  // every option string, short ones left out
                "--base-size",                 // inherited
                "--conditional",               // under an if: Megatron may define it
                "--disable-fuse-thing",        // bool defaulting to True: --no-/--disable-
                "--disable-maybe-thing",       // Optional[bool] = None is not False either
                "--kind", "--maybe-too",       // bool | None = False: a plain flag
                "--no-fuse-thing", "--no-maybe-thing", "--num-layers",
                "--other-name",       // argparse_meta arg_names replace the field's name
                "--overridden-flag",  // the subclass's default False wins
                "--plain", "--train-iters",
                "--use-thing"}));  // no derived (init=False), skipped_field, counter (ClassVar)
  EXPECT_CONTAINS(run.output, "// Megatron-LM test_v1 (commit abc);\n",
                  "// The 16 argument names that release defines",
                  "const std::vector<std::string>& megatron_argument_names() {");
}

TEST(MegatronNamesScript, RefusesWhatItCannotReadStatically) {
  ScratchDir dir("megatron_names_bad");
  const ScriptRun computed =
      run_script(dir, "def f(parser, name):\n    parser.add_argument(name, type=int)\n");
  EXPECT_NE(computed.status, 0);
  EXPECT_CONTAINS(computed.errors, "line 2: option string is not a literal: name");
  const ScriptRun unknown = run_script(
      dir, "def f(parser):\n    ArgumentGroupFactory(MissingConfig).build_group(parser)\n");
  EXPECT_NE(unknown.status, 0);
  EXPECT_CONTAINS(unknown.errors, "dataclass MissingConfig: 0 definitions (nowhere)");
}

}  // namespace
