// moe-preprocess-data: JSON lines -> Megatron indexed datasets, as Megatron's
// tools/preprocess_data.py does (same flags, same output names <prefix>_<key>_document.{bin,idx},
// same token layout), with worker threads in place of processes.
//
//   moe-preprocess-data --input corpus.jsonl --output-prefix data/corpus
//       --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model --append-eod --workers 2
//
// A malformed line (bad JSON, not an object, missing key, text that is not a string or a list of
// strings) stops the run with its line number; with --skip-malformed it is reported, skipped and
// counted instead. Outputs appear only when the run succeeds.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "moe/data/indexed_dataset.h"
#include "moe/data/tokenizer.h"
#include "moe/tensor/error.h"

namespace {

using moe::data::IndexedDatasetBuilder;
using moe::data::Tokenizer;

constexpr int kUsageError = 2;

struct Options {
  std::string input;
  std::vector<std::string> json_keys{"text"};
  bool append_eod = false;
  int workers = 1;
  std::string output_prefix;
  int64_t log_interval = 1000;
  bool skip_malformed = false;
  moe::data::TokenizerOptions tokenizer;
};

// One input line, encoded: per key, the document's tokens and its sentence lengths.
struct EncodedLine {
  std::vector<std::vector<int64_t>> tokens;
  std::vector<std::vector<int32_t>> lengths;
  std::string error;  // non-empty when the line is malformed
};

// Megatron's Encoder.encode for one line.
EncodedLine encode_line(const std::string& line, const Options& options,
                        const Tokenizer& tokenizer) {
  EncodedLine out;
  nlohmann::json record;
  try {
    record = nlohmann::json::parse(line);
  } catch (const nlohmann::json::exception& error) {
    out.error = std::string("invalid JSON: ") + error.what();
    return out;
  }
  if (!record.is_object()) {
    out.error = "expected a JSON object, got " + std::string(record.type_name());
    return out;
  }
  for (const std::string& key : options.json_keys) {
    const auto value = record.find(key);
    if (value == record.end()) {
      out.error = "no key \"" + key + "\"";
      return out;
    }
    std::vector<std::string_view> sentences;  // into `record`, not copied
    if (value->is_string()) {
      sentences.push_back(value->get_ref<const std::string&>());
    } else if (value->is_array()) {
      for (const auto& sentence : *value) {
        if (!sentence.is_string()) {
          out.error = "\"" + key + "\" holds a list with a " + sentence.type_name() +
                      " element; expected strings";
          return out;
        }
        sentences.push_back(sentence.get_ref<const std::string&>());
      }
    } else {
      out.error =
          "\"" + key + "\" is a " + value->type_name() + ", expected a string or a list of strings";
      return out;
    }
    std::vector<int64_t> document;
    std::vector<int32_t> lengths;
    try {
      for (std::string_view sentence : sentences) {
        const std::vector<int64_t> ids = tokenizer.tokenize(sentence);
        if (ids.empty()) continue;
        document.insert(document.end(), ids.begin(), ids.end());
        lengths.push_back(int32_t(ids.size()));
      }
    } catch (const moe::Error& error) {
      out.error = "\"" + key + "\" cannot be tokenized: " + error.what();
      return out;
    }
    if (!document.empty() && options.append_eod) {
      document.push_back(tokenizer.eod());
      lengths.back() += 1;
    }
    out.tokens.push_back(std::move(document));
    out.lengths.push_back(std::move(lengths));
  }
  return out;
}

int run(const Options& options, const Tokenizer& tokenizer) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const moe::data::TokenDType dtype = moe::data::optimal_token_dtype(tokenizer.vocab_size());

  std::ifstream input(options.input, std::ios::binary);
  MOE_CHECK(input.good(), "cannot open --input ", options.input);
  std::printf("Opening %s\n", options.input.c_str());
  std::printf("Tokenizer %s: vocabulary %lld, eod %lld; token dtype %s; %d worker(s)\n",
              std::string(tokenizer.type()).c_str(), (long long)tokenizer.vocab_size(),
              (long long)tokenizer.eod(), std::string(moe::data::token_dtype_name(dtype)).c_str(),
              options.workers);
  std::fflush(stdout);  // keep the header before the progress lines on stderr

  std::vector<std::string> prefixes;
  std::vector<std::unique_ptr<IndexedDatasetBuilder>> builders;
  for (const std::string& key : options.json_keys) {
    prefixes.push_back(options.output_prefix + "_" + key + "_document");
    builders.push_back(std::make_unique<IndexedDatasetBuilder>(prefixes.back(), dtype));
  }

  // Lines are read in batches, encoded in parallel and written in input order.
  const size_t batch_lines = 256 * size_t(options.workers);
  std::vector<std::string> lines;
  std::vector<EncodedLine> encoded;
  int64_t line_number = 0, documents = 0, empty_documents = 0, malformed = 0, bytes = 0;
  constexpr int64_t kMalformedShown = 100;
  int64_t next_report = options.log_interval;
  const auto report = [&](bool final_line) {
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    std::fprintf(stderr, "%s %lld documents (%.1f docs/s, %.2f MB/s).\n",
                 final_line ? "Done:" : "Processed", (long long)documents,
                 double(documents) / std::max(seconds, 1e-9),
                 double(bytes) / std::max(seconds, 1e-9) / 1024.0 / 1024.0);
  };
  while (true) {
    lines.clear();
    std::string line;
    while (lines.size() < batch_lines && std::getline(input, line)) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      lines.push_back(std::move(line));
    }
    if (lines.empty()) break;
    encoded.assign(lines.size(), {});
#pragma omp parallel for num_threads(options.workers) schedule(dynamic, 8)
    for (size_t i = 0; i < lines.size(); ++i) {
      try {
        encoded[i] = encode_line(lines[i], options, tokenizer);
      } catch (const std::exception& error) {  // nothing may escape the parallel region
        encoded[i].error = error.what();
      }
    }
    for (size_t i = 0; i < lines.size(); ++i) {
      ++line_number;
      bytes += int64_t(lines[i].size()) + 1;
      if (!encoded[i].error.empty()) {
        MOE_CHECK(options.skip_malformed, options.input, " line ", line_number, ": ",
                  encoded[i].error, " (pass --skip-malformed to skip such lines)");
        if (malformed < kMalformedShown) {
          std::fprintf(stderr, "skipping %s line %lld: %s\n", options.input.c_str(),
                       (long long)line_number, encoded[i].error.c_str());
        } else if (malformed == kMalformedShown) {
          std::fprintf(stderr, "(further malformed lines are counted but not shown)\n");
        }
        ++malformed;
        continue;
      }
      for (size_t k = 0; k < builders.size(); ++k) {
        builders[k]->add_document(encoded[i].tokens[k], encoded[i].lengths[k]);
      }
      if (encoded[i].tokens.front().empty()) ++empty_documents;
      ++documents;
      if (documents == next_report) {
        report(false);
        next_report += options.log_interval;
      }
    }
  }
  MOE_CHECK(!input.bad(), "error reading ", options.input);
  for (auto& builder : builders) builder->finalize();
  report(true);

  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  std::printf(
      "Summary: %lld lines read, %lld documents written (%lld empty), %lld malformed "
      "line(s) skipped, %.2f MB in %.2f s (%.2f MB/s)\n",
      (long long)line_number, (long long)documents, (long long)empty_documents,
      (long long)malformed, double(bytes) / 1024.0 / 1024.0, seconds,
      double(bytes) / std::max(seconds, 1e-9) / 1024.0 / 1024.0);
  for (size_t k = 0; k < builders.size(); ++k) {
    std::printf("  %s: %lld sequences, %lld tokens -> %s.{bin,idx}\n", options.json_keys[k].c_str(),
                (long long)builders[k]->sequence_count(), (long long)builders[k]->token_count(),
                prefixes[k].c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  CLI::App app{"Tokenize JSON lines into Megatron indexed datasets (<prefix>_<key>_document)"};
  app.add_option("--input", options.input, "JSON-lines file, one document per line")->required();
  app.add_option("--json-keys", options.json_keys, "Keys to extract from each JSON object")
      ->capture_default_str();
  app.add_flag("--append-eod", options.append_eod, "Append the eod token to every document");
  app.add_option("--workers", options.workers, "Tokenizer threads")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--output-prefix", options.output_prefix, "Output path prefix")->required();
  app.add_option("--log-interval", options.log_interval, "Documents between progress lines")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_flag("--skip-malformed", options.skip_malformed,
               "Report and skip malformed lines instead of stopping at the first one");
  std::string types;
  for (const std::string& name : moe::data::tokenizer_types()) types += " " + name;
  app.add_option("--tokenizer-type", options.tokenizer.type, "One of:" + types)->required();
  app.add_option("--tokenizer-model", options.tokenizer.model, "SentencePiece model file");
  app.add_option("--vocab-file", options.tokenizer.vocab_file, "GPT-2 vocab.json");
  app.add_option("--merge-file", options.tokenizer.merge_file, "GPT-2 merges.txt");
  app.add_option("--vocab-size", options.tokenizer.vocab_size, "NullTokenizer vocabulary size");
  // Exit status: 2 for a bad command line (flags, or tokenizer flags that build no tokenizer),
  // as moe-train and Megatron's argparse use; 1 for a failure while reading or writing data.
  const auto fail = [](int status, const char* what) {
    std::fprintf(stderr, "moe-preprocess-data: error: %s\n", what);
    if (status == kUsageError) std::fprintf(stderr, "Run with --help for the flags.\n");
    return status;
  };
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::printf("%s", app.help().c_str());
    return 0;
  } catch (const CLI::ParseError& error) {
    return fail(kUsageError, error.what());
  }
  std::unique_ptr<Tokenizer> tokenizer;
  try {
    tokenizer = moe::data::make_tokenizer(options.tokenizer);
  } catch (const std::exception& error) {
    return fail(kUsageError, error.what());
  }
  try {
    return run(options, *tokenizer);
  } catch (const std::exception& error) {
    return fail(1, error.what());
  }
}
