// Tokenizers: a SentencePiece model trained here on a fixed text (ids below are what that
// training yields with Debian 12's sentencepiece 0.1.97), GPT-2 byte-level BPE on a hand-made
// vocabulary whose byte tokens have the byte's value as id, NullTokenizer, ByteTokenizer, and
// Megatron's vocabulary padding.
#include "moe/data/tokenizer.h"

#include <gtest/gtest.h>
#include <sentencepiece_trainer.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "moe/tensor/error.h"
#include "support/testing.h"
#include "test_files.h"

namespace moe::data {
namespace {

using moe::testing::ScratchDir;

using Ids = std::vector<int64_t>;

using moe::testing::expect_error_containing;

// ------------------------------------------------------------------------------------------------
// SentencePiece

class SentencePieceTokenizers : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new ScratchDir("data");
    {
      std::ofstream corpus(dir_->file("corpus.txt"));
      for (int i = 0; i < 20; ++i) {
        corpus << "the cat sat on the mat\nthe dog sat on the log\na cat and a dog\n";
      }
    }
    const auto status = sentencepiece::SentencePieceTrainer::Train(
        "--input=" + dir_->file("corpus.txt") + " --model_prefix=" + dir_->file("tiny") +
        " --vocab_size=30 --model_type=bpe --num_threads=1 --minloglevel=2");
    ASSERT_TRUE(status.ok()) << status.ToString();
  }
  static void TearDownTestSuite() { delete dir_; }

  static std::unique_ptr<Tokenizer> make(const std::string& type) {
    TokenizerOptions options;
    options.type = type;
    options.model = dir_->file("tiny.model");
    return make_tokenizer(options);
  }

  // Pieces of the trained model: 0 <unk>, 1 <s>, 2 </s>, 6 "▁the", 8 "▁a", 14 "▁cat",
  // 15 "▁dog", 16 "▁sat", 17 "▁", 29 "m", 3 "at".
  static ScratchDir* dir_;
};
ScratchDir* SentencePieceTokenizers::dir_ = nullptr;

TEST_F(SentencePieceTokenizers, Llama2PrependsBosAndUsesEosAsEod) {
  const auto tokenizer = make("Llama2Tokenizer");
  EXPECT_EQ(tokenizer->type(), "Llama2Tokenizer");
  EXPECT_EQ(tokenizer->vocab_size(), 30);
  EXPECT_EQ(tokenizer->bos(), 1);
  EXPECT_EQ(tokenizer->eod(), 2);
  EXPECT_EQ(tokenizer->pad(), kNoToken);
  EXPECT_EQ(tokenizer->tokenize("the cat sat"), (Ids{1, 6, 14, 16}));
  EXPECT_EQ(tokenizer->tokenize("the mat"), (Ids{1, 6, 17, 29, 3}));
  EXPECT_EQ(tokenizer->tokenize("xyz"), (Ids{1, 17, 0}));  // unknown characters -> <unk>
  EXPECT_EQ(tokenizer->detokenize(Ids{1, 6, 14, 16, 2}), "the cat sat");
  expect_error_containing([&] { tokenizer->detokenize(Ids{30}); }, "token id 30 is outside");
}

TEST_F(SentencePieceTokenizers, GptSentencePieceAddsNothing) {
  const auto tokenizer = make("GPTSentencePieceTokenizer");
  EXPECT_EQ(tokenizer->tokenize("a dog"), (Ids{8, 15}));
  EXPECT_EQ(tokenizer->eod(), 2);
  EXPECT_EQ(tokenizer->detokenize(Ids{8, 15}), "a dog");
}

TEST_F(SentencePieceTokenizers, SentencePieceTokenizerAddsMegatronSpecialTokens) {
  const auto tokenizer = make("SentencePieceTokenizer");
  // <CLS> 30, <SEP> 31, <EOD> 32, <MASK> 33, <PAD> 34 (the model has no pad); <s> and </s> exist.
  EXPECT_EQ(tokenizer->vocab_size(), 35);
  EXPECT_EQ(tokenizer->eod(), 32);
  EXPECT_EQ(tokenizer->pad(), 34);
  EXPECT_EQ(tokenizer->bos(), 1);
  EXPECT_EQ(tokenizer->tokenize("the cat<EOD>a dog"), (Ids{6, 14, 32, 8, 15}));
  EXPECT_EQ(tokenizer->tokenize("<s>the cat<MASK>"), (Ids{1, 6, 14, 33}));
  EXPECT_EQ(tokenizer->detokenize(Ids{6, 14, 32, 8, 15}), "the cat <EOD> a dog");
}

TEST_F(SentencePieceTokenizers, MissingModelIsAClearError) {
  TokenizerOptions options{.type = "Llama2Tokenizer", .model = dir_->file("absent.model")};
  expect_error_containing([&] { make_tokenizer(options); },
                          "cannot load SentencePiece model " + dir_->file("absent.model"));
  options.model.clear();
  expect_error_containing([&] { make_tokenizer(options); },
                          "Llama2Tokenizer needs --tokenizer-model");
}

// ------------------------------------------------------------------------------------------------
// GPT-2 BPE

// GPT-2's byte -> printable code point map, restated for the test.
std::string byte_symbol(int byte) {
  const bool printable = (byte >= '!' && byte <= '~') || (byte >= 0xA1 && byte <= 0xAC) ||
                         (byte >= 0xAE && byte <= 0xFF);
  int code_point = byte;
  if (!printable) {
    code_point = 256;
    for (int b = 0; b < byte; ++b) {
      const bool p = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      if (!p) ++code_point;
    }
  }
  std::string out;
  if (code_point < 0x80) {
    out += char(code_point);
  } else {
    out += char(0xC0 | (code_point >> 6));
    out += char(0x80 | (code_point & 0x3F));
  }
  return out;
}

class Gpt2Bpe : public ::testing::Test {
 protected:
  void SetUp() override {
    nlohmann::json vocab;
    for (int b = 0; b < 256; ++b) vocab[byte_symbol(b)] = b;  // byte tokens: id = byte value
    const std::string space = byte_symbol(' ');               // "Ġ"
    const std::vector<std::pair<std::string, std::string>> merges = {
        {"h", "e"},   {"l", "l"},          {"he", "ll"}, {"hell", "o"},         {space, "w"},
        {"o", "r"},   {space + "w", "or"}, {"l", "d"},   {space + "wor", "ld"}, {"'", "s"},
        {space, "b"}, {"x", "y"}};
    int64_t id = 256;
    std::ofstream merge_file(dir_.file("merges.txt"));
    merge_file << "#version: 0.2\n";
    for (const auto& [first, second] : merges) {
      merge_file << first << " " << second << "\n";
      if (first + second != "xy") vocab[first + second] = id++;  // "xy" stays out: unknown -> 0
    }
    vocab["<|endoftext|>"] = id;
    std::ofstream(dir_.file("vocab.json")) << vocab.dump();
  }
  std::unique_ptr<Tokenizer> make(const std::string& vocab = "vocab.json",
                                  const std::string& merges = "merges.txt") const {
    return make_tokenizer({.type = "GPT2BPETokenizer",
                           .vocab_file = dir_.file(vocab),
                           .merge_file = dir_.file(merges)});
  }
  ScratchDir dir_{"data"};
};

// Merged ids: he 256, ll 257, hell 258, hello 259, Ġw 260, or 261, Ġwor 262, ld 263,
// Ġworld 264, 's 265, Ġb 266, <|endoftext|> 267.
TEST_F(Gpt2Bpe, EncodesKnownStrings) {
  const auto tokenizer = make();
  EXPECT_EQ(tokenizer->vocab_size(), 268);
  EXPECT_EQ(tokenizer->eod(), 267);
  EXPECT_EQ(tokenizer->pad(), kNoToken);
  EXPECT_EQ(tokenizer->tokenize("hello world"), (Ids{259, 264}));
  EXPECT_EQ(tokenizer->tokenize("world"), (Ids{'w', 261, 263}));  // no space: no Ġw merges
  EXPECT_EQ(tokenizer->tokenize("it's"), (Ids{'i', 't', 265}));   // contraction split off
  EXPECT_EQ(tokenizer->tokenize("a  b"), (Ids{'a', ' ', 266}));   // last space joins the word
  EXPECT_EQ(tokenizer->tokenize("x\n\nb"), (Ids{'x', '\n', '\n', 'b'}));
  EXPECT_EQ(tokenizer->tokenize(" 123abc!?"), (Ids{' ', '1', '2', '3', 'a', 'b', 'c', '!', '?'}));
  EXPECT_EQ(tokenizer->tokenize("héllo"), (Ids{'h', 0xC3, 0xA9, 257, 'o'}));
  EXPECT_EQ(tokenizer->tokenize("xy"), (Ids{0}));  // a merge outside the vocabulary -> id 0
  EXPECT_EQ(tokenizer->tokenize("hello  "), (Ids{259, ' ', ' '}));
  EXPECT_EQ(tokenizer->tokenize(""), (Ids{}));
}

TEST_F(Gpt2Bpe, DecodesBytesBackToText) {
  const auto tokenizer = make();
  for (const std::string text : {"hello world", "it's  a\ttest\n", "héllo 日本 語 ٣!", ""}) {
    EXPECT_EQ(tokenizer->detokenize(tokenizer->tokenize(text)), text);
  }
  EXPECT_EQ(tokenizer->detokenize(Ids{0xC3}), "\xEF\xBF\xBD");  // lone lead byte
  EXPECT_EQ(tokenizer->detokenize(Ids{0xE2, 0x82, 'a'}),
            "\xEF\xBF\xBD"
            "a");  // one U+FFFD
  expect_error_containing([&] { tokenizer->detokenize(Ids{999}); },
                          "token id 999 is not in the GPT-2");
}

TEST_F(Gpt2Bpe, BadFilesAreClearErrors) {
  std::ofstream(dir_.file("broken.json")) << "{\"a\": 1,";
  expect_error_containing([&] { make("broken.json"); },
                          dir_.file("broken.json") + " is not valid JSON");
  std::ofstream(dir_.file("no_eod.json")) << "{\"a\": 0}";
  expect_error_containing([&] { make("no_eod.json"); }, "has no <|endoftext|> token");
  expect_error_containing([&] { make("absent.json"); },
                          "cannot open GPT-2 vocabulary " + dir_.file("absent.json"));
  // A path that opens but cannot be read (a directory) is a read error, not an empty file: an
  // unread merges file would otherwise leave a tokenizer without merges.
  std::filesystem::create_directory(dir_.file("folder"));
  expect_error_containing([&] { make("vocab.json", "folder"); },
                          "reading GPT-2 merges file " + dir_.file("folder") + " failed");
  expect_error_containing([&] { make("folder"); },
                          "reading GPT-2 vocabulary " + dir_.file("folder") + " failed");
}

// ------------------------------------------------------------------------------------------------
// Null, byte, factory, padding

TEST(NullTokenizer, IdsAreTheText) {
  const auto tokenizer = make_tokenizer({.type = "NullTokenizer", .vocab_size = 100});
  EXPECT_EQ(tokenizer->vocab_size(), 101);
  EXPECT_EQ(tokenizer->eod(), 100);
  EXPECT_EQ(tokenizer->tokenize("5 17 0 99"), (Ids{5, 17, 0, 99}));
  EXPECT_EQ(tokenizer->detokenize(Ids{5, 17, 0}), "5 17 0");
  expect_error_containing([&] { tokenizer->tokenize("5 x 7"); },
                          "NullTokenizer: 'x' is not an integer");
  expect_error_containing([&] { make_tokenizer({.type = "NullTokenizer"}); },
                          "needs --vocab-size > 0");
}

TEST(ByteTokenizer, IdsAreUtf8Bytes) {
  const auto tokenizer = make_tokenizer({.type = "ByteTokenizer"});
  EXPECT_EQ(tokenizer->vocab_size(), 257);
  EXPECT_EQ(tokenizer->eod(), 256);
  EXPECT_EQ(tokenizer->tokenize("hé"), (Ids{'h', 0xC3, 0xA9}));
  EXPECT_EQ(tokenizer->detokenize(Ids{'h', 0xC3, 0xA9, 256}), "hé");
  expect_error_containing([&] { tokenizer->detokenize(Ids{300}); },
                          "token id 300 is outside [0, 256]");
}

TEST(TokenizerFactory, UnknownTypeListsTheSupportedOnes) {
  expect_error_containing(
      [&] { make_tokenizer({.type = "BertWordPieceCase"}); },
      "unknown --tokenizer-type 'BertWordPieceCase' (supported: Llama2Tokenizer, "
      "SentencePieceTokenizer");
}

TEST(PaddedVocabSize, MatchesMegatron) {
  EXPECT_EQ(padded_vocab_size(50257, 128, 1), 50304);  // GPT-2
  EXPECT_EQ(padded_vocab_size(50257, 128, 8), 51200);
  EXPECT_EQ(padded_vocab_size(32000, 128, 1), 32000);  // Llama 2
  EXPECT_EQ(padded_vocab_size(257, 128, 2), 512);
  EXPECT_EQ(padded_vocab_size(1, 1, 1), 1);
  expect_error_containing([] { padded_vocab_size(100, 0, 1); },
                          "--make-vocab-size-divisible-by (0)");
}

}  // namespace
}  // namespace moe::data
