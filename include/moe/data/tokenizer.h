// Tokenizers named by Megatron's --tokenizer-type, with the special ids Megatron gives them
// (megatron/training/tokenizer/tokenizer.py):
//   Llama2Tokenizer          SentencePiece model; tokenize() prepends bos; eod = eos; vocab =
//   pieces GPTSentencePieceTokenizer SentencePiece model; no bos added; eod = eos
//   SentencePieceTokenizer   SentencePiece model plus <CLS> <SEP> <EOD> <MASK> (and pad/bos/eos
//                            pieces the model lacks) appended after the model's pieces; eod =
//                            <EOD>; special-token strings in text map to their ids
//   GPT2BPETokenizer         byte-level BPE from vocab.json + merges.txt; eod = <|endoftext|>
//   NullTokenizer            text is space-separated integer ids; vocab = --vocab-size + 1;
//                            eod = --vocab-size
//   ByteTokenizer            (moecore) ids are the UTF-8 bytes 0..255; eod = 256; vocab = 257
// Ids a tokenizer does not define are kNoToken (-1), which is also Megatron's fallback pad id.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moe::data {

constexpr int64_t kNoToken = -1;

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  virtual std::string_view type() const = 0;  // the --tokenizer-type name
  // The unpadded vocabulary size, as Megatron's tokenizer.vocab_size.
  virtual int64_t vocab_size() const = 0;
  virtual int64_t eod() const = 0;
  virtual int64_t bos() const { return kNoToken; }
  virtual int64_t pad() const { return kNoToken; }

  // Thread-safe: const and free of shared mutable state, so workers may share one tokenizer.
  virtual std::vector<int64_t> tokenize(std::string_view text) const = 0;
  virtual std::string detokenize(std::span<const int64_t> ids) const = 0;
};

// Megatron's tokenizer flags.
struct TokenizerOptions {
  std::string type = {};        // --tokenizer-type
  std::string model = {};       // --tokenizer-model (SentencePiece tokenizers)
  std::string vocab_file = {};  // --vocab-file (GPT2BPETokenizer: vocab.json)
  std::string merge_file = {};  // --merge-file (GPT2BPETokenizer: merges.txt)
  int64_t vocab_size = 0;       // --vocab-size (NullTokenizer)
};

// Builds the tokenizer; an unknown type, a missing file or a bad file throws moe::Error.
std::unique_ptr<Tokenizer> make_tokenizer(const TokenizerOptions& options);
// The accepted --tokenizer-type names.
std::vector<std::string> tokenizer_types();

// Megatron's _vocab_size_with_padding: rounds vocab_size up to a multiple of
// make_vocab_size_divisible_by * tensor_parallel_size.
int64_t padded_vocab_size(int64_t vocab_size, int64_t make_vocab_size_divisible_by,
                          int64_t tensor_parallel_size);

}  // namespace moe::data
