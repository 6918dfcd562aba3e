// moe-preprocess-data, run as a program: malformed lines are fatal with their line number by
// default and skipped with a count under --skip-malformed; progress and a summary are printed;
// the output is the Megatron layout preprocess_data.py writes; workers do not change it.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "moe/data/indexed_dataset.h"
#include "support/testing.h"
#include "test_files.h"

namespace moe::data {
namespace {

using moe::testing::read_bytes;
using moe::testing::ScratchDir;
using moe::testing::write_bytes;

using Ids = std::vector<int64_t>;

const char* const kMixedInput =
    "{\"text\": \"hello\"}\n"               // 1
    "{\"text\": \"\"}\n"                    // 2 empty document
    "{\"text\": \"oops\"\n"                 // 3 bad JSON
    "{\"text\": [\"ab\", \"\", \"cd\"]}\n"  // 4 sentences
    "{\"title\": \"x\"}\n"                  // 5 missing key
    "{\"text\": 42}\n"                      // 6 wrong type
    "[1, 2]\n"                              // 7 not an object
    "\n"                                    // 8 empty line
    "{\"text\": \"bye\"}\n";                // 9

class PreprocessTool : public ::testing::Test {
 protected:
  testing::CommandResult run(const std::string& input, const std::string& flags) {
    write_bytes(dir_.file("input.jsonl"), input);
    return testing::run_command(std::string(MOE_PREPROCESS_TOOL) + " --input " +
                                dir_.file("input.jsonl") + " --output-prefix " + dir_.file("out") +
                                " " + flags);
  }
  static void expect_contains(const std::string& output, const std::string& fragment) {
    EXPECT_CONTAINS(output, fragment);
  }
  ScratchDir dir_{"data"};
};

TEST_F(PreprocessTool, MalformedLineIsFatalByDefaultAndLeavesNoOutput) {
  const auto result = run(kMixedInput, "--tokenizer-type ByteTokenizer --append-eod");
  EXPECT_EQ(result.exit_code, 1) << result.output;
  expect_contains(result.output, dir_.file("input.jsonl") + " line 3: invalid JSON");
  expect_contains(result.output, "pass --skip-malformed");
  for (const char* suffix : {".bin", ".idx", ".bin.tmp", ".idx.tmp"}) {
    EXPECT_FALSE(std::filesystem::exists(dir_.file("out_text_document") + suffix)) << suffix;
  }
}

TEST_F(PreprocessTool, SkipsMalformedLinesWithTheirNumbersAndACount) {
  const auto result = run(kMixedInput,
                          "--tokenizer-type ByteTokenizer --append-eod --skip-malformed "
                          "--log-interval 1 --workers 2");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  for (const char* fragment :
       {"line 3: invalid JSON", "line 5: no key \"text\"", "line 6: \"text\" is a number",
        "line 7: expected a JSON object, got array", "line 8: invalid JSON",
        "Processed 1 documents (", "MB/s)",
        "Summary: 9 lines read, 4 documents written (1 empty), 5 malformed line(s)"}) {
    expect_contains(result.output, fragment);
  }
  expect_contains(result.output, "text: 4 sequences, 15 tokens");

  const IndexedDataset dataset(dir_.file("out_text_document"));
  EXPECT_EQ(dataset.dtype(), TokenDType::U16);  // vocabulary 257 < 65500
  EXPECT_EQ(Ids(dataset.document_indices().begin(), dataset.document_indices().end()),
            (Ids{0, 1, 1, 3, 4}));  // the empty document holds no sequence
  EXPECT_EQ(dataset.sequence(0), (Ids{'h', 'e', 'l', 'l', 'o', 256}));
  EXPECT_EQ(dataset.sequence(1), (Ids{'a', 'b'}));  // empty sentence dropped, eod on the last
  EXPECT_EQ(dataset.sequence(2), (Ids{'c', 'd', 256}));
  EXPECT_EQ(dataset.sequence(3), (Ids{'b', 'y', 'e', 256}));
}

TEST_F(PreprocessTool, WorkersDoNotChangeTheOutputAndKeysGetTheirOwnFiles) {
  const std::string flags = "--tokenizer-type NullTokenizer --vocab-size 70000 ";
  // NullTokenizer text is space-separated ids.
  std::string ids_input;
  for (int i = 0; i < 3000; ++i) {
    ids_input += "{\"text\": \"" + std::to_string(i) + " " + std::to_string(i * 7 % 69999) +
                 "\", \"title\": \"" + std::to_string(i % 5) + "\"}\n";
  }
  ASSERT_EQ(run(ids_input, flags + "--json-keys text title --workers 1").exit_code, 0);
  const std::string text_bin = read_bytes(dir_.file("out_text_document.bin"));
  const std::string text_idx = read_bytes(dir_.file("out_text_document.idx"));
  const IndexedDataset titles(dir_.file("out_title_document"));
  EXPECT_EQ(titles.dtype(), TokenDType::I32);  // vocabulary 70001 >= 65500
  EXPECT_EQ(titles.sequence(7), (Ids{2}));
  const auto result = run(ids_input, flags + "--json-keys text title --workers 3");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_EQ(read_bytes(dir_.file("out_text_document.bin")), text_bin);
  EXPECT_EQ(read_bytes(dir_.file("out_text_document.idx")), text_idx);
  EXPECT_EQ(IndexedDataset(dir_.file("out_text_document")).sequence(2999),
            (Ids{2999, 2999 * 7 % 69999}));
}

TEST_F(PreprocessTool, BadFlagsAndFilesAreClearErrors) {
  auto result = run("{\"text\": \"a\"}\n", "--tokenizer-type Nope");
  EXPECT_EQ(result.exit_code, 2);
  expect_contains(result.output, "unknown --tokenizer-type 'Nope'");
  result = testing::run_command(std::string(MOE_PREPROCESS_TOOL) + " --input " +
                                dir_.file("absent.jsonl") + " --output-prefix " + dir_.file("out") +
                                " --tokenizer-type ByteTokenizer");
  EXPECT_EQ(result.exit_code, 1);
  expect_contains(result.output, "cannot open --input " + dir_.file("absent.jsonl"));
  result = run("{\"text\": \"1 x\"}\n", "--tokenizer-type NullTokenizer --vocab-size 10");
  EXPECT_EQ(result.exit_code, 1);
  expect_contains(result.output, "line 1: \"text\" cannot be tokenized: NullTokenizer: 'x'");
}

// Every bad command line exits 2 (as moe-train and argparse do) with a message and a pointer to
// --help; failures while processing the data exit 1 (above).
TEST_F(PreprocessTool, UsageErrorsExitTwo) {
  const std::string tool = MOE_PREPROCESS_TOOL;
  auto result = testing::run_command(tool);
  EXPECT_EQ(result.exit_code, 2) << result.output;
  expect_contains(result.output, "moe-preprocess-data: error: --input is required");
  expect_contains(result.output, "Run with --help for the flags.");
  result = run("{\"text\": \"a\"}\n", "--tokenizer-type ByteTokenizer --bogus 3");
  EXPECT_EQ(result.exit_code, 2) << result.output;
  expect_contains(result.output,
                  "moe-preprocess-data: error: The following arguments were not "
                  "expected: 3 --bogus");
  result = run("{\"text\": \"a\"}\n", "--tokenizer-type ByteTokenizer --workers 0");
  EXPECT_EQ(result.exit_code, 2) << result.output;
  expect_contains(result.output, "--workers");
  result = run("{\"text\": \"a\"}\n", "--tokenizer-type NullTokenizer");
  EXPECT_EQ(result.exit_code, 2) << result.output;
  expect_contains(result.output, "--vocab-size");
  result = testing::run_command(tool + " --help");
  EXPECT_EQ(result.exit_code, 0) << result.output;
  expect_contains(result.output, "--output-prefix");
}

}  // namespace
}  // namespace moe::data
