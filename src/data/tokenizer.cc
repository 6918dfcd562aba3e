#include "moe/data/tokenizer.h"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

#include "data/unicode_tables.h"
#include "moe/tensor/error.h"

namespace moe::data {

// ------------------------------------------------------------------------------------------------
// Unicode helpers

namespace unicode {
namespace {
bool in_ranges(const CodePointRange* ranges, size_t count, uint32_t code_point) {
  const CodePointRange* end = ranges + count;
  const CodePointRange* it = std::upper_bound(
      ranges, end, code_point, [](uint32_t cp, const CodePointRange& r) { return cp < r.first; });
  return it != ranges && code_point <= (it - 1)->last;
}
}  // namespace

bool is_letter(uint32_t code_point) {
  return in_ranges(kLetterRanges, kLetterRanges_count, code_point);
}
bool is_number(uint32_t code_point) {
  return in_ranges(kNumberRanges, kNumberRanges_count, code_point);
}
bool is_whitespace(uint32_t code_point) {
  return (code_point >= 0x09 && code_point <= 0x0D) || code_point == 0x20 || code_point == 0x85 ||
         code_point == 0xA0 || code_point == 0x1680 ||
         (code_point >= 0x2000 && code_point <= 0x200A) || code_point == 0x2028 ||
         code_point == 0x2029 || code_point == 0x202F || code_point == 0x205F ||
         code_point == 0x3000;
}
}  // namespace unicode

namespace {

constexpr uint32_t kReplacementCharacter = 0xFFFD;

void append_utf8(uint32_t code_point, std::string& out) {
  if (code_point < 0x80) {
    out += char(code_point);
  } else if (code_point < 0x800) {
    out += char(0xC0 | (code_point >> 6));
    out += char(0x80 | (code_point & 0x3F));
  } else if (code_point < 0x10000) {
    out += char(0xE0 | (code_point >> 12));
    out += char(0x80 | ((code_point >> 6) & 0x3F));
    out += char(0x80 | (code_point & 0x3F));
  } else {
    out += char(0xF0 | (code_point >> 18));
    out += char(0x80 | ((code_point >> 12) & 0x3F));
    out += char(0x80 | ((code_point >> 6) & 0x3F));
    out += char(0x80 | (code_point & 0x3F));
  }
}

// Decodes one UTF-8 character at text[at]. A malformed sequence yields U+FFFD and consumes its
// maximal valid prefix (at least one byte), the replacement rule Python's decoder follows.
uint32_t next_code_point(std::string_view text, size_t& at) {
  const auto byte = [&](size_t i) { return uint8_t(text[i]); };
  const uint8_t lead = byte(at);
  if (lead < 0x80) {
    ++at;
    return lead;
  }
  size_t length = 0;
  uint32_t value = 0;
  uint8_t second_low = 0x80, second_high = 0xBF;
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2, value = lead & 0x1F;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3, value = lead & 0x0F;
    if (lead == 0xE0) second_low = 0xA0;
    if (lead == 0xED) second_high = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4, value = lead & 0x07;
    if (lead == 0xF0) second_low = 0x90;
    if (lead == 0xF4) second_high = 0x8F;
  } else {
    ++at;
    return kReplacementCharacter;
  }
  size_t i = 1;
  for (; i < length && at + i < text.size(); ++i) {
    const uint8_t low = i == 1 ? second_low : 0x80, high = i == 1 ? second_high : 0xBF;
    if (byte(at + i) < low || byte(at + i) > high) break;
    value = (value << 6) | (byte(at + i) & 0x3F);
  }
  at += i;
  return i == length ? value : kReplacementCharacter;
}

// Replaces malformed UTF-8 with U+FFFD (Python's errors='replace').
std::string sanitize_utf8(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (size_t at = 0; at < bytes.size();) append_utf8(next_code_point(bytes, at), out);
  return out;
}

// The whole file; a read error (a directory, an I/O failure) is refused rather than taken for an
// empty or shortened file.
std::string read_file(const std::string& path, std::string_view what) {
  std::ifstream in(path, std::ios::binary);
  MOE_CHECK(in.is_open(), "cannot open ", what, " ", path);
  std::string contents;
  char buffer[1 << 16];
  while (in.read(buffer, sizeof(buffer)) || in.gcount() > 0) {
    contents.append(buffer, size_t(in.gcount()));
  }
  MOE_CHECK(!in.bad() && in.eof(), "reading ", what, " ", path, " failed");
  return contents;
}

// ------------------------------------------------------------------------------------------------
// SentencePiece family

class SentencePieceModel {
 public:
  explicit SentencePieceModel(const std::string& path, std::string_view type) {
    MOE_CHECK(!path.empty(), type, " needs --tokenizer-model (a SentencePiece .model file)");
    const auto status = processor_.Load(path);
    MOE_CHECK(status.ok(), "cannot load SentencePiece model ", path, ": ", status.ToString());
  }
  const sentencepiece::SentencePieceProcessor& processor() const { return processor_; }
  int64_t piece_count() const { return processor_.GetPieceSize(); }
  // id_to_piece, or `fallback` where the id is undefined (negative) as Python's IndexError.
  std::string piece_or(int id, std::string fallback) const {
    return id >= 0 && id < processor_.GetPieceSize() ? processor_.IdToPiece(id) : fallback;
  }

  void encode(std::string_view text, std::vector<int64_t>& out) const {
    std::vector<int> ids;
    const auto status = processor_.Encode(text, &ids);
    MOE_CHECK(status.ok(), "SentencePiece encode failed: ", status.ToString());
    out.insert(out.end(), ids.begin(), ids.end());
  }
  std::string decode(std::span<const int64_t> ids) const {
    std::vector<int> narrow;
    narrow.reserve(ids.size());
    for (int64_t id : ids) {
      MOE_CHECK(id >= 0 && id < piece_count(), "token id ", id,
                " is outside the SentencePiece vocabulary [0, ", piece_count(), ")");
      narrow.push_back(int(id));
    }
    std::string text;
    const auto status = processor_.Decode(narrow, &text);
    MOE_CHECK(status.ok(), "SentencePiece decode failed: ", status.ToString());
    return text;
  }

 private:
  sentencepiece::SentencePieceProcessor processor_;
};

// Llama2Tokenizer (bos prepended) and GPTSentencePieceTokenizer (plain).
class PlainSentencePieceTokenizer final : public Tokenizer {
 public:
  PlainSentencePieceTokenizer(const std::string& path, std::string_view type, bool prepend_bos)
      : model_(path, type), type_(type), prepend_bos_(prepend_bos) {}

  std::string_view type() const override { return type_; }
  int64_t vocab_size() const override { return model_.piece_count(); }
  int64_t eod() const override { return model_.processor().eos_id(); }
  int64_t bos() const override { return model_.processor().bos_id(); }
  int64_t pad() const override { return model_.processor().pad_id(); }

  std::vector<int64_t> tokenize(std::string_view text) const override {
    std::vector<int64_t> ids;
    if (prepend_bos_) ids.push_back(bos());
    model_.encode(text, ids);
    return ids;
  }
  std::string detokenize(std::span<const int64_t> ids) const override { return model_.decode(ids); }

 private:
  SentencePieceModel model_;
  std::string type_;
  bool prepend_bos_;
};

// SentencePieceTokenizer: the model's pieces plus Megatron's special tokens, which are matched
// literally in text and spaced out when decoding (NeMo's scheme that Megatron adopted).
class SpecialTokenSentencePieceTokenizer final : public Tokenizer {
 public:
  explicit SpecialTokenSentencePieceTokenizer(const std::string& path)
      : model_(path, "SentencePieceTokenizer") {
    for (int64_t id = 0; id < model_.piece_count(); ++id) {
      vocab_.emplace(model_.processor().IdToPiece(int(id)), id);
    }
    vocab_size_ = int64_t(vocab_.size());
    add_special("<CLS>");
    add_special("<SEP>");
    eod_ = add_special("<EOD>");
    add_special("<MASK>");
    const auto& sp = model_.processor();
    pad_ = add_special(model_.piece_or(sp.pad_id(), "<PAD>"));
    bos_ = add_special(model_.piece_or(sp.bos_id(), "<BOS>"));
    add_special(model_.piece_or(sp.eos_id(), "<EOS>"));
  }

  std::string_view type() const override { return "SentencePieceTokenizer"; }
  int64_t vocab_size() const override { return vocab_size_; }
  int64_t eod() const override { return eod_; }
  int64_t bos() const override { return bos_; }
  int64_t pad() const override { return pad_; }

  std::vector<int64_t> tokenize(std::string_view text) const override {
    std::vector<int64_t> ids;
    size_t at = 0;
    while (true) {
      // The earliest special token; on a tie, the one registered first.
      size_t best_position = std::string_view::npos;
      const Special* best = nullptr;
      for (const Special& special : specials_) {
        const size_t position = text.find(special.text, at);
        if (position < best_position) best_position = position, best = &special;
      }
      if (best == nullptr) break;
      model_.encode(text.substr(at, best_position - at), ids);
      ids.push_back(best->id);
      at = best_position + best->text.size();
    }
    model_.encode(text.substr(at), ids);
    return ids;
  }

  std::string detokenize(std::span<const int64_t> ids) const override {
    std::string text;
    size_t last = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      const auto special = special_by_id_.find(ids[i]);
      if (special == special_by_id_.end()) continue;
      text += model_.decode(ids.subspan(last, i - last)) + " " + special->second + " ";
      last = i + 1;
    }
    return text + model_.decode(ids.subspan(last));
  }

 private:
  struct Special {
    std::string text;
    int64_t id;
  };
  int64_t add_special(const std::string& text) {
    auto [entry, inserted] = vocab_.emplace(text, vocab_size_);
    if (inserted) ++vocab_size_;
    const bool known = std::any_of(specials_.begin(), specials_.end(),
                                   [&](const Special& s) { return s.text == text; });
    if (!known) specials_.push_back({text, entry->second});
    special_by_id_[entry->second] = text;
    return entry->second;
  }

  SentencePieceModel model_;
  std::unordered_map<std::string, int64_t> vocab_;
  int64_t vocab_size_ = 0;
  std::vector<Special> specials_;  // in registration order
  std::unordered_map<int64_t, std::string> special_by_id_;
  int64_t eod_ = kNoToken, bos_ = kNoToken, pad_ = kNoToken;
};

// ------------------------------------------------------------------------------------------------
// GPT-2 byte-level BPE

// GPT-2's reversible map from bytes to printable code points (bytes_to_unicode).
std::array<uint32_t, 256> byte_to_code_point_table() {
  std::array<uint32_t, 256> table{};
  std::array<bool, 256> printable{};
  for (int b = '!'; b <= '~'; ++b) printable[size_t(b)] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) printable[size_t(b)] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) printable[size_t(b)] = true;
  uint32_t next_unprintable = 256;
  for (int b = 0; b < 256; ++b) table[size_t(b)] = printable[size_t(b)] ? b : next_unprintable++;
  return table;
}

class Gpt2BpeTokenizer final : public Tokenizer {
 public:
  Gpt2BpeTokenizer(const std::string& vocab_file, const std::string& merge_file) {
    MOE_CHECK(!vocab_file.empty() && !merge_file.empty(),
              "GPT2BPETokenizer needs --vocab-file (vocab.json) and --merge-file (merges.txt)");
    load_vocab(vocab_file);
    load_merges(merge_file);
    const auto table = byte_to_code_point_table();
    for (int b = 0; b < 256; ++b) {
      append_utf8(table[size_t(b)], byte_symbols_[size_t(b)]);
      code_point_to_byte_[table[size_t(b)]] = uint8_t(b);
    }
    const auto eod = encoder_.find("<|endoftext|>");
    MOE_CHECK(eod != encoder_.end(), "GPT-2 vocabulary ", vocab_file,
              " has no <|endoftext|> token, which Megatron uses as eod");
    eod_ = eod->second;
  }

  std::string_view type() const override { return "GPT2BPETokenizer"; }
  int64_t vocab_size() const override { return int64_t(encoder_.size()); }
  int64_t eod() const override { return eod_; }

  std::vector<int64_t> tokenize(std::string_view text) const override {
    std::vector<int64_t> ids;
    std::vector<std::string> word;
    for (std::string_view chunk : pre_tokenize(text)) {
      word.clear();
      for (char c : chunk) word.push_back(byte_symbols_[uint8_t(c)]);
      merge(word);
      for (const std::string& symbol : word) {
        const auto found = encoder_.find(symbol);
        ids.push_back(found == encoder_.end() ? 0 : found->second);  // Megatron maps unknowns to 0
      }
    }
    return ids;
  }

  std::string detokenize(std::span<const int64_t> ids) const override {
    std::string bytes;
    for (int64_t id : ids) {
      const auto found = decoder_.find(id);
      MOE_CHECK(found != decoder_.end(), "token id ", id, " is not in the GPT-2 vocabulary");
      const std::string& symbol = found->second;
      for (size_t at = 0; at < symbol.size();) {
        const uint32_t code_point = next_code_point(symbol, at);
        const auto byte = code_point_to_byte_.find(code_point);
        MOE_CHECK(byte != code_point_to_byte_.end(), "GPT-2 vocabulary entry '", symbol, "' (id ",
                  id, ") is not byte-level encoded");
        bytes += char(byte->second);
      }
    }
    return sanitize_utf8(bytes);
  }

 private:
  void load_vocab(const std::string& path) {
    nlohmann::json vocab;
    try {
      vocab = nlohmann::json::parse(read_file(path, "GPT-2 vocabulary"));
    } catch (const nlohmann::json::exception& error) {
      throw Error(detail::concat("GPT-2 vocabulary ", path, " is not valid JSON: ", error.what()));
    }
    MOE_CHECK(vocab.is_object(), "GPT-2 vocabulary ", path,
              " must be a JSON object mapping tokens to ids");
    for (const auto& [token, id] : vocab.items()) {
      MOE_CHECK(id.is_number_integer() && id.get<int64_t>() >= 0, "GPT-2 vocabulary ", path,
                ": token '", token, "' has id ", id.dump(), ", not a non-negative integer");
      encoder_[token] = id.get<int64_t>();
      decoder_[id.get<int64_t>()] = token;
    }
  }

  // merges.txt: a "#version" line, then one "first second" merge per line in priority order
  // (Megatron skips the first line whatever it holds).
  void load_merges(const std::string& path) {
    std::istringstream lines(read_file(path, "GPT-2 merges file"));
    std::string line;
    std::getline(lines, line);
    for (int64_t rank = 0; std::getline(lines, line);) {
      std::istringstream fields(line);
      std::string first, second, extra;
      if (!(fields >> first >> second) || (fields >> extra)) continue;
      merge_ranks_[first + ' ' + second] = rank++;
    }
  }

  // `key` is the caller's scratch buffer, so a merge pass allocates no string per pair.
  int64_t rank_of(const std::string& first, const std::string& second, std::string& key) const {
    key.assign(first).append(1, ' ').append(second);
    const auto found = merge_ranks_.find(key);
    return found == merge_ranks_.end() ? std::numeric_limits<int64_t>::max() : found->second;
  }

  // Repeatedly merges every occurrence of the lowest-ranked adjacent pair, as GPT-2's bpe().
  void merge(std::vector<std::string>& word) const {
    std::vector<std::string> merged;
    std::string key;
    while (word.size() > 1) {
      int64_t best_rank = std::numeric_limits<int64_t>::max();
      size_t best = 0;
      for (size_t i = 0; i + 1 < word.size(); ++i) {
        const int64_t rank = rank_of(word[i], word[i + 1], key);
        if (rank < best_rank) best_rank = rank, best = i;
      }
      if (best_rank == std::numeric_limits<int64_t>::max()) break;
      const std::string first = word[best], second = word[best + 1];
      merged.clear();
      for (size_t i = 0; i < word.size();) {
        if (i + 1 < word.size() && word[i] == first && word[i + 1] == second) {
          merged.push_back(first + second);
          i += 2;
        } else {
          merged.push_back(std::move(word[i]));
          i += 1;
        }
      }
      word.swap(merged);
    }
  }

  // GPT-2's pattern 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  // applied left to right, returning the matched byte ranges.
  static std::vector<std::string_view> pre_tokenize(std::string_view text) {
    std::vector<uint32_t> cps;
    std::vector<size_t> offsets;
    for (size_t at = 0; at < text.size();) {
      offsets.push_back(at);
      cps.push_back(next_code_point(text, at));
    }
    offsets.push_back(text.size());
    const size_t n = cps.size();
    enum class Kind { Letter, Number, Other, Space };
    const auto kind = [&](size_t i) {
      if (unicode::is_whitespace(cps[i])) return Kind::Space;
      if (unicode::is_letter(cps[i])) return Kind::Letter;
      if (unicode::is_number(cps[i])) return Kind::Number;
      return Kind::Other;
    };
    const auto run_end = [&](size_t i, Kind k) {
      while (i < n && kind(i) == k) ++i;
      return i;
    };
    std::vector<std::string_view> chunks;
    for (size_t i = 0; i < n;) {
      size_t end = i;
      if (cps[i] == '\'' && i + 1 < n) {
        const uint32_t a = cps[i + 1], b = i + 2 < n ? cps[i + 2] : 0;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') {
          end = i + 2;
        } else if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) {
          end = i + 3;
        }
      }
      if (end == i) {
        const size_t start = cps[i] == ' ' && i + 1 < n ? i + 1 : i;
        const Kind k = kind(start);
        if (k != Kind::Space) {
          end = run_end(start, k);
        } else {
          // \s+(?!\S) leaves the last space of a run for the word after it; \s+ takes a lone one.
          end = run_end(i, Kind::Space);
          if (end < n && end - i >= 2) --end;
        }
      }
      chunks.push_back(text.substr(offsets[i], offsets[end] - offsets[i]));
      i = end;
    }
    return chunks;
  }

  std::unordered_map<std::string, int64_t> encoder_;
  std::unordered_map<int64_t, std::string> decoder_;
  std::unordered_map<std::string, int64_t> merge_ranks_;  // "first second" -> priority
  std::array<std::string, 256> byte_symbols_;
  std::unordered_map<uint32_t, uint8_t> code_point_to_byte_;
  int64_t eod_ = kNoToken;
};

// ------------------------------------------------------------------------------------------------
// Null and byte tokenizers

class NullTokenizer final : public Tokenizer {
 public:
  explicit NullTokenizer(int64_t vocab_size) : vocab_size_without_eod_(vocab_size) {
    MOE_CHECK(vocab_size > 0, "NullTokenizer needs --vocab-size > 0, got ", vocab_size);
  }
  std::string_view type() const override { return "NullTokenizer"; }
  int64_t vocab_size() const override { return vocab_size_without_eod_ + 1; }
  int64_t eod() const override { return vocab_size_without_eod_; }

  // Space-separated integer ids (an empty text is an empty document).
  std::vector<int64_t> tokenize(std::string_view text) const override {
    std::vector<int64_t> ids;
    if (text.empty()) return ids;
    size_t at = 0;
    while (true) {
      const size_t space = text.find(' ', at);
      std::string_view field =
          text.substr(at, space == std::string_view::npos ? space : space - at);
      while (!field.empty() && unicode::is_whitespace(uint8_t(field.front())))
        field.remove_prefix(1);
      while (!field.empty() && unicode::is_whitespace(uint8_t(field.back())))
        field.remove_suffix(1);
      if (!field.empty() && field.front() == '+') field.remove_prefix(1);
      int64_t id = 0;
      const auto [end, error] = std::from_chars(field.data(), field.data() + field.size(), id);
      MOE_CHECK(!field.empty() && error == std::errc() && end == field.data() + field.size(),
                "NullTokenizer: '", text.substr(at, space - at),
                "' is not an integer token id (text must be space-separated ids)");
      ids.push_back(id);
      if (space == std::string_view::npos) break;
      at = space + 1;
    }
    return ids;
  }
  std::string detokenize(std::span<const int64_t> ids) const override {
    std::string text;
    for (size_t i = 0; i < ids.size(); ++i) {
      if (i > 0) text += ' ';
      text += std::to_string(ids[i]);
    }
    return text;
  }

 private:
  int64_t vocab_size_without_eod_;
};

class ByteTokenizer final : public Tokenizer {
 public:
  std::string_view type() const override { return "ByteTokenizer"; }
  int64_t vocab_size() const override { return 257; }
  int64_t eod() const override { return 256; }
  std::vector<int64_t> tokenize(std::string_view text) const override {
    return std::vector<int64_t>(reinterpret_cast<const uint8_t*>(text.data()),
                                reinterpret_cast<const uint8_t*>(text.data()) + text.size());
  }
  // Bytes back to text; eod marks are dropped.
  std::string detokenize(std::span<const int64_t> ids) const override {
    std::string text;
    for (int64_t id : ids) {
      MOE_CHECK(id >= 0 && id <= 256, "ByteTokenizer: token id ", id,
                " is outside [0, 256] (bytes 0-255, eod 256)");
      if (id < 256) text += char(uint8_t(id));
    }
    return text;
  }
};

}  // namespace

std::vector<std::string> tokenizer_types() {
  return {"Llama2Tokenizer",  "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
          "GPT2BPETokenizer", "NullTokenizer",          "ByteTokenizer"};
}

std::unique_ptr<Tokenizer> make_tokenizer(const TokenizerOptions& options) {
  const std::string& type = options.type;
  if (type == "Llama2Tokenizer") {
    return std::make_unique<PlainSentencePieceTokenizer>(options.model, type, true);
  }
  if (type == "GPTSentencePieceTokenizer") {
    return std::make_unique<PlainSentencePieceTokenizer>(options.model, type, false);
  }
  if (type == "SentencePieceTokenizer") {
    return std::make_unique<SpecialTokenSentencePieceTokenizer>(options.model);
  }
  if (type == "GPT2BPETokenizer") {
    return std::make_unique<Gpt2BpeTokenizer>(options.vocab_file, options.merge_file);
  }
  if (type == "NullTokenizer") return std::make_unique<NullTokenizer>(options.vocab_size);
  if (type == "ByteTokenizer") return std::make_unique<ByteTokenizer>();
  std::string known;
  for (const std::string& name : tokenizer_types()) known += (known.empty() ? "" : ", ") + name;
  throw Error(detail::concat("unknown --tokenizer-type '", type, "' (supported: ", known, ")"));
}

int64_t padded_vocab_size(int64_t vocab_size, int64_t make_vocab_size_divisible_by,
                          int64_t tensor_parallel_size) {
  MOE_CHECK(vocab_size > 0, "vocabulary size must be positive, got ", vocab_size);
  MOE_CHECK(make_vocab_size_divisible_by > 0 && tensor_parallel_size > 0,
            "--make-vocab-size-divisible-by (", make_vocab_size_divisible_by,
            ") and the tensor-parallel size (", tensor_parallel_size, ") must be positive");
  const int64_t multiple = make_vocab_size_divisible_by * tensor_parallel_size;
  return (vocab_size + multiple - 1) / multiple * multiple;
}

}  // namespace moe::data
