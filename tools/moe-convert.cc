// moe-convert: Hugging Face MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3) in
// safetensors <-> moecore checkpoints, on one process. The family comes from config.json's
// architectures or model_type.
//   moe-convert --from hf --to moecore --input HF_DIR --output CKPT_DIR [--dtype bf16]
//   moe-convert --from moecore --to hf --input CKPT_DIR --output HF_DIR [--hf-config FILE]
// The whole model is held in memory once (plus one tensor in flight); --verify re-reads what was
// written (checksums included) and compares it with the model in memory. docs/convert.md.
#include <CLI/CLI.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <set>

#include "moe/checkpoint/checkpoint.h"
#include "moe/comm/parallel_state.h"
#include "moe/convert/hf_deepseek.h"
#include "moe/convert/hf_moe.h"
#include "moe/convert/safetensors.h"
#include "moe/model/config.h"
#include "moe/tensor/error.h"
#include "moe/train/arguments.h"
#include "moe/train/layer_pattern.h"

namespace {

namespace fs = std::filesystem;
using namespace moe;
using convert::hf_moe::HfMoeConfig;

struct Options {
  std::string from, to, input, output, dtype, hf_config;
  int64_t iteration = 0;
  int64_t global_batch_size = 0;  // hf->moecore with --iteration > 0: the resuming run's
  bool verify = false;
  int64_t make_vocab_size_divisible_by = 128;
  int tensor_model_parallel_size = 1;
  uint64_t max_shard_bytes = uint64_t(5) << 30;
};

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  MOE_CHECK(in.is_open(), "cannot open '", path, "'");
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    MOE_CHECK(false, "'", path, "' is not valid JSON: ", e.what());
  }
  return {};
}

// The conversion steps every family shares. Config is hf_moe::HfMoeConfig or
// hf_deepseek::DeepSeekConfig; the unqualified moecore_param_specs, hf_tensor_shapes,
// hf_to_moecore, hf_tensor_entries and hf_tensor_source calls below find the ones of its
// namespace by argument-dependent lookup.
template <class Config>
void allocate_model(ParameterStore& store, const Config& config) {
  for (const ParamSpec& spec : moecore_param_specs(config)) {
    store.declare(spec);
  }
  store.allocate();
}

// --verify: the tensor `name` as re-read from the output equals the one written.
void check_same_tensor(const std::string& name, const Tensor& written, const Tensor& reread,
                       const std::string& output) {
  MOE_CHECK(written.dtype() == reread.dtype() && written.shape() == reread.shape() &&
                std::memcmp(written.raw(), reread.raw(), written.nbytes()) == 0,
            "--verify: tensor '", name, "' re-read from '", output,
            "' differs from the one written");
}

// --verify for hf->moecore: the checkpoint loads (checksums checked) into a fresh model equal,
// byte for byte, to the converted one.
template <class Config>
void verify_checkpoint(const Options& options, const Config& config, const ParameterStore& store) {
  ParameterStore reread(store.param_dtype());
  allocate_model(reread, config);
  checkpoint::LoadOptions load;
  load.load_optim = false;
  load.load_rng = false;
  checkpoint::load_checkpoint(options.output, reread, nullptr, nullptr,
                              comm::single_process_state(), load);
  for (int i = 0; i < store.count(); ++i) {
    check_same_tensor(store.spec(ParamHandle{i}).name, store.param(ParamHandle{i}),
                      reread.param(ParamHandle{i}), options.output);
  }
  std::cout << "verified: " << store.count() << " tensors re-read from " << options.output
            << " match\n";
}

// HF safetensors -> a moecore checkpoint; model_name names the family in messages.
template <class Config>
void import_hf_model(const Options& options, Config config, const std::string& model_name) {
  config.padded_vocab_size = model::padded_vocab_size(
      config.vocab_size, options.make_vocab_size_divisible_by, options.tensor_model_parallel_size);
  convert::safetensors::Checkpoint hf(options.input);
  std::set<std::string> expected;
  for (const auto& [name, shape] : hf_tensor_shapes(config)) {
    expected.insert(name);
    MOE_CHECK(hf.contains(name), "'", options.input, "' has no tensor '", name, "' that a ",
              model_name, " model with this config.json needs");
  }
  for (const std::string& name : hf.names()) {
    // Older exports carry the rotary frequencies as a buffer; they follow from rope_theta.
    if (name.ends_with(".rotary_emb.inv_freq")) continue;
    MOE_CHECK(expected.count(name), "'", hf.file_of(name), "' holds tensor '", name, "' that a ",
              model_name, " model has no place for (a different architecture?)");
  }
  const DType dtype = options.dtype.empty() ? hf.info("model.embed_tokens.weight").dtype
                                            : parse_dtype(options.dtype);
  ParameterStore store(dtype);
  allocate_model(store, config);
  hf_to_moecore(
      config, [&](const std::string& name) { return hf.read(name); }, store);

  checkpoint::TrainingState state;
  state.iteration = options.iteration;
  // A resume without --finetune continues the data after the samples iteration N consumed.
  state.consumed_train_samples = options.iteration * options.global_batch_size;
  state.extra["hf_config"] = config.to_json();
  state.extra["converted_from"] = options.input;
  checkpoint::save_checkpoint(options.output, state, store, nullptr, nullptr,
                              comm::single_process_state());
  if (options.verify) verify_checkpoint(options, config, store);
  std::cout << "wrote " << checkpoint::iteration_dir_name(options.iteration) << " ("
            << dtype_name(dtype) << ") under " << options.output << ", vocabulary padded from "
            << config.vocab_size << " to " << config.padded_vocab_size << " rows, "
            << state.consumed_train_samples
            << " consumed training samples\nmoe-train flags for this model: "
            << config.megatron_flags() << " --make-vocab-size-divisible-by "
            << options.make_vocab_size_divisible_by
            << "\nload it with: moe-train <those flags> --load " << options.output
            << " --finetune (it holds no optimizer state) --tensor-model-parallel-size "
            << options.tensor_model_parallel_size << " (another tp needs another padding)\n";
}

// A moecore checkpoint's `iteration` -> HF safetensors and config.json; returns the dtype written.
template <class Config>
DType export_hf_model(const Options& options, Config config, int64_t iteration, int64_t vocab_rows,
                      DType param_dtype) {
  config.padded_vocab_size = vocab_rows;
  MOE_CHECK(vocab_rows >= config.vocab_size, "'", options.input, "' holds ", vocab_rows,
            " vocabulary rows, fewer than the config's vocab_size (", config.vocab_size, ")");
  ParameterStore store(param_dtype);
  allocate_model(store, config);
  checkpoint::LoadOptions load;
  load.load_optim = false;
  load.load_rng = false;
  load.iteration = iteration;
  checkpoint::load_checkpoint(options.input, store, nullptr, nullptr, comm::single_process_state(),
                              load);

  const DType dtype = options.dtype.empty() ? store.param_dtype() : parse_dtype(options.dtype);
  const auto entries = hf_tensor_entries(config, dtype);
  const auto source = hf_tensor_source(config, store, dtype);
  convert::safetensors::write_checkpoint(options.output, entries, source, {{"format", "pt"}},
                                         options.max_shard_bytes);
  if (options.verify) {  // each tensor re-read (its checksum checked) and rebuilt, one at a time
    const convert::safetensors::Checkpoint written(options.output);
    for (const auto& entry : entries) {
      check_same_tensor(entry.name, source(entry.name), written.read(entry.name), options.output);
    }
    std::cout << "verified: " << entries.size() << " tensors re-read from " << options.output
              << " match\n";
  }
  nlohmann::json hf_config = config.to_json();
  hf_config["torch_dtype"] = dtype == DType::BF16  ? "bfloat16"
                             : dtype == DType::F16 ? "float16"
                                                   : "float32";
  const fs::path config_path = fs::path(options.output) / "config.json";
  {
    std::ofstream out(config_path.string() + ".tmp", std::ios::trunc);
    out << hf_config.dump(2) << "\n";
    MOE_CHECK(out.good(), "writing '", config_path.string(), ".tmp' failed");
  }
  fs::rename(config_path.string() + ".tmp", config_path);
  return dtype;
}

void hf_to_moecore(const Options& options) {
  const std::string config_path = (fs::path(options.input) / "config.json").string();
  MOE_CHECK(fs::exists(config_path), "'", options.input,
            "' has no config.json: not a Hugging Face model directory");
  const nlohmann::json hf_config = read_json(config_path);
  // DeepSeek-V2/V3 (hf_deepseek.h): chosen by config.json's model_type or architectures.
  if (convert::hf_deepseek::is_deepseek_config(hf_config)) {
    return import_hf_model(options,
                           convert::hf_deepseek::DeepSeekConfig::from_json(hf_config, config_path),
                           "DeepSeek");
  }
  const HfMoeConfig config = HfMoeConfig::from_json(hf_config, config_path);
  if (config.family == convert::hf_moe::Family::kMixtral && hf_config.contains("sliding_window") &&
      hf_config["sliding_window"].is_number_integer()) {
    std::cout
        << "note: config.json sets sliding_window " << hf_config["sliding_window"]
        << "; moecore's attention is fully causal, the same for sequences up to that length\n";
  }
  import_hf_model(options, config, convert::hf_moe::architecture_name(config.family));
}

// The embedding's rows as saved (the padded vocabulary), from the rank index files.
int64_t saved_vocab_rows(const fs::path& iteration_dir, const nlohmann::json& metadata) {
  for (const auto& rank : metadata.at("ranks")) {
    const std::string index_path = (iteration_dir / rank.at("index").get<std::string>()).string();
    const nlohmann::json index = read_json(index_path);
    for (const auto& piece : index.at("tensors")) {
      if (piece.at("name") == "embedding.word_embeddings.weight") {
        return piece.at("global_shape").at(0).get<int64_t>();
      }
    }
  }
  MOE_CHECK(false, "'", iteration_dir.string(),
            "' holds no embedding.word_embeddings.weight: not a GPT model checkpoint");
  return 0;
}

// A moe-train checkpoint's model, from the command line its metadata records. The family
// follows from the flags: --qk-layernorm is Qwen3-MoE, gated shared experts Qwen2-MoE, neither
// Mixtral. vocab_rows (the saved, padded vocabulary) becomes vocab_size: the tokenizer's own size
// is not recorded.
HfMoeConfig config_from_training_args(const nlohmann::json& metadata, int64_t vocab_rows,
                                      const std::string& source) {
  using convert::hf_moe::Family;
  const std::string hint = ": pass --hf-config with the config.json describing it";
  MOE_CHECK(metadata.contains("args") && metadata["args"].contains("command_line"), source,
            " records neither an HF config nor a moe-train command line", hint);
  const train::TrainingArguments a =
      train::parse_arguments(metadata["args"]["command_line"].get<std::vector<std::string>>()).args;
  const Family family = a.qk_layernorm                                      ? Family::kQwen3Moe
                        : a.moe_shared_expert_intermediate_size.has_value() ? Family::kQwen2Moe
                                                                            : Family::kMixtral;
  std::vector<std::string> problems;
  if (!a.num_layers || !a.hidden_size || !a.num_attention_heads) {
    problems.push_back("no --num-layers, --hidden-size or --num-attention-heads");
  }
  if (a.normalization != "RMSNorm") problems.push_back("--normalization " + a.normalization);
  if (!a.swiglu) problems.push_back("no --swiglu");
  if (a.position_embedding_type != "rope") {
    problems.push_back("--position-embedding-type " + a.position_embedding_type);
  }
  if (a.add_bias_linear) problems.push_back("biases (no --disable-bias-linear)");
  if (!a.num_experts) problems.push_back("no --num-experts");
  if (a.moe_router_score_function != "softmax") {
    problems.push_back("--moe-router-score-function " + a.moe_router_score_function);
  }
  if (a.moe_router_topk_scaling_factor) problems.push_back("--moe-router-topk-scaling-factor");
  if (a.moe_router_type != "topk") problems.push_back("--moe-router-type " + a.moe_router_type);
  if (a.moe_router_num_groups) problems.push_back("--moe-router-num-groups");
  if (a.multi_latent_attention) problems.push_back("--multi-latent-attention");
  if (a.mtp_num_layers.value_or(0) > 0) problems.push_back("--mtp-num-layers");
  if (!a.ffn_hidden_size) problems.push_back("no --ffn-hidden-size");
  if (family == Family::kMixtral) {
    if (a.add_qkv_bias) problems.push_back("--add-qkv-bias");
    if (a.moe_layer_freq != "1") problems.push_back("--moe-layer-freq " + a.moe_layer_freq);
    // Mixtral renormalises the top-k of a softmax over all experts: Megatron's default order.
    if (a.moe_router_pre_softmax) problems.push_back("--moe-router-pre-softmax");
    if (a.moe_ffn_hidden_size && a.moe_ffn_hidden_size != a.ffn_hidden_size) {
      problems.push_back("--moe-ffn-hidden-size differing from --ffn-hidden-size");
    }
  }
  if (family == Family::kQwen3Moe) {
    if (a.add_qkv_bias) problems.push_back("--qk-layernorm with --add-qkv-bias");
    if (a.moe_shared_expert_intermediate_size) {
      problems.push_back("--qk-layernorm with shared experts");
    }
  }
  if (family == Family::kQwen2Moe && !a.moe_shared_expert_gate) {
    problems.push_back("shared experts without --moe-shared-expert-gate");
  }
  std::string listed;
  for (const std::string& problem : problems) listed += (listed.empty() ? "" : ", ") + problem;
  MOE_CHECK(problems.empty(), source, " holds a model HF's ",
            convert::hf_moe::architecture_name(family), " cannot express (", listed, ")", hint);
  HfMoeConfig c;
  c.family = family;
  c.vocab_size = vocab_rows;
  c.hidden_size = *a.hidden_size;
  c.intermediate_size = *a.ffn_hidden_size;
  c.num_hidden_layers = *a.num_layers;
  c.num_attention_heads = *a.num_attention_heads;
  c.num_key_value_heads = a.group_query_attention ? a.num_query_groups : c.num_attention_heads;
  // head_dim only when it differs from HF's default hidden_size / num_attention_heads.
  if (a.kv_channels && int64_t(*a.kv_channels) * c.num_attention_heads != c.hidden_size) {
    c.head_dim = *a.kv_channels;
  }
  c.num_local_experts = *a.num_experts;
  c.num_experts_per_tok = a.moe_router_topk;
  c.max_position_embeddings = a.max_position_embeddings.value_or(a.seq_length.value_or(4096));
  c.rope_theta = a.rotary_base;
  c.rms_norm_eps = a.norm_epsilon;
  c.tie_word_embeddings = !a.untie_embeddings_and_output_weights;
  if (family != Family::kMixtral) {
    c.moe_intermediate_size = a.moe_ffn_hidden_size.value_or(c.intermediate_size);
    c.norm_topk_prob = !a.moe_router_pre_softmax;
    // Megatron's pattern as HF's dense-layer list (decoder_sparse_step 1).
    const std::vector<bool> pattern =
        train::layer_pattern("--moe-layer-freq", a.moe_layer_freq, int(c.num_hidden_layers));
    for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
      if (!pattern[size_t(layer)]) c.mlp_only_layers.push_back(layer);
    }
  }
  if (family == Family::kQwen2Moe) {
    c.shared_expert_intermediate_size = *a.moe_shared_expert_intermediate_size;
    c.qkv_bias = a.add_qkv_bias;
  }
  c.validate();
  return c;
}

void moecore_to_hf(const Options& options) {
  std::optional<int64_t> iteration = options.iteration > 0
                                         ? std::optional<int64_t>(options.iteration)
                                         : checkpoint::read_tracker(options.input);
  MOE_CHECK(iteration.has_value(), "'", options.input,
            "' has no latest_checkpointed_iteration.txt: not a moecore checkpoint directory");
  const fs::path iteration_dir =
      fs::path(options.input) / checkpoint::iteration_dir_name(*iteration);
  const std::string metadata_path = (iteration_dir / "metadata.json").string();
  nlohmann::json metadata = read_json(metadata_path);
  const int64_t vocab_rows = saved_vocab_rows(iteration_dir, metadata);
  const DType param_dtype = parse_dtype(metadata.at("param_dtype").get<std::string>());
  // The HF config, read once: --hf-config, else the one recorded at import, else none.
  const bool from_file = !options.hf_config.empty();
  const bool recorded = metadata.contains("extra") && metadata["extra"].contains("hf_config");
  const nlohmann::json hf_config = from_file  ? read_json(options.hf_config)
                                   : recorded ? metadata["extra"]["hf_config"]
                                              : nlohmann::json();
  const std::string hf_config_source = from_file ? options.hf_config : metadata_path;
  if (convert::hf_deepseek::is_deepseek_config(hf_config)) {
    const auto config =
        convert::hf_deepseek::DeepSeekConfig::from_json(hf_config, hf_config_source);
    const DType dtype = export_hf_model(options, config, *iteration, vocab_rows, param_dtype);
    std::cout << "wrote a Hugging Face DeepSeek-V" << config.version << " model ("
              << dtype_name(dtype) << ") from iteration " << *iteration << " to " << options.output
              << "\n";
    return;
  }
  HfMoeConfig config;
  if (from_file || recorded) {
    config = HfMoeConfig::from_json(hf_config, hf_config_source);
  } else {
    config = config_from_training_args(metadata, vocab_rows, "'" + metadata_path + "'");
    std::cout << "note: the model config comes from the moe-train command line in " << metadata_path
              << "; vocab_size is the " << vocab_rows
              << " saved (padded) rows: pass --hf-config to set the tokenizer's size\n";
  }
  const DType dtype = export_hf_model(options, config, *iteration, vocab_rows, param_dtype);
  std::cout << "wrote a Hugging Face " << convert::hf_moe::architecture_name(config.family) << " ("
            << dtype_name(dtype) << ") from iteration " << *iteration << " to " << options.output
            << "\n";
}

void run_conversion(const Options& options) {
  MOE_CHECK(options.from == "hf" || options.global_batch_size == 0,
            "--global-batch-size applies to hf -> moecore only");
  MOE_CHECK(options.from != "hf" || options.iteration == 0 || options.global_batch_size > 0,
            "--iteration ", options.iteration,
            " needs --global-batch-size (the resuming run's) so that the checkpoint records the ",
            "samples those iterations consumed; without it a resume would restart the data");
  MOE_CHECK(options.from != options.to, "--from and --to are both '", options.from,
            "': convert hf -> moecore or moecore -> hf");
  MOE_CHECK(fs::is_directory(options.input), "--input '", options.input, "' is not a directory");
  MOE_CHECK(!fs::exists(options.output) || fs::is_empty(options.output), "--output '",
            options.output, "' exists and is not empty: choose a new or empty directory");
  if (!options.dtype.empty()) {
    DType dtype = parse_dtype(options.dtype);
    MOE_CHECK(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16,
              "--dtype must be fp32, bf16 or fp16, got '", options.dtype, "'");
  }
  // The output was new or empty, so a failed conversion removes whatever it wrote there (a
  // sharded HF model missing its later shards or its index must not look like a model).
  const bool output_existed = fs::exists(options.output);
  try {
    if (options.from == "hf") {
      hf_to_moecore(options);
    } else {
      moecore_to_hf(options);
    }
  } catch (...) {
    std::error_code ignored;
    if (output_existed) {
      for (const auto& entry : fs::directory_iterator(options.output, ignored)) {
        fs::remove_all(entry.path(), ignored);
      }
    } else {
      fs::remove_all(options.output, ignored);
    }
    throw;
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "Convert Hugging Face Mixtral / Qwen2-MoE / Qwen3-MoE safetensors <-> moecore checkpoints"};
  Options options;
  const std::set<std::string> formats = {"hf", "moecore"};
  app.add_option("--from", options.from, "input format")->required()->check(CLI::IsMember(formats));
  app.add_option("--to", options.to, "output format")->required()->check(CLI::IsMember(formats));
  app.add_option("--input", options.input, "input directory")->required();
  app.add_option("--output", options.output, "output directory (new or empty)")->required();
  app.add_option("--dtype", options.dtype, "output dtype: fp32, bf16, fp16 (default: the input's)");
  app.add_option("--iteration", options.iteration,
                 "hf->moecore: iteration to save as (default 0); moecore->hf: iteration to "
                 "read (default: the tracker's)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--global-batch-size", options.global_batch_size,
                 "hf->moecore with --iteration N > 0: the global batch size of the run that "
                 "resumes it; the checkpoint records N x this many consumed samples")
      ->check(CLI::PositiveNumber);
  app.add_flag("--verify", options.verify,
               "re-read everything written (checksums included) and compare it with the model "
               "in memory");
  app.add_option("--make-vocab-size-divisible-by", options.make_vocab_size_divisible_by,
                 "hf->moecore: pad the vocabulary as moe-train will (default 128)")
      ->check(CLI::PositiveNumber);
  app.add_option("--tensor-model-parallel-size", options.tensor_model_parallel_size,
                 "hf->moecore: the tp size the vocabulary padding must divide by (default 1)")
      ->check(CLI::PositiveNumber);
  app.add_option("--hf-config", options.hf_config,
                 "moecore->hf: the config.json describing the checkpoint (default: the "
                 "one moe-convert recorded in it)");
  app.add_option("--max-shard-bytes", options.max_shard_bytes,
                 "moecore->hf: largest safetensors shard (default 5 GiB)")
      ->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  try {
    run_conversion(options);
  } catch (const std::exception& error) {
    std::cerr << "moe-convert: error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
