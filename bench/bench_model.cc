// Forward+backward throughput of a small Mixtral-like GPT model next to the same model in
// PyTorch (CPU), measured in the same invocation.
//
// Model: 4 layers, hidden 512, 8 heads in 4 query groups (head dim 64), RMSNorm, rope, SwiGLU,
// no biases, untied output layer, every layer MoE with 8 experts (ffn 1024), top-2, softmax
// after top-k, no aux loss (Megatron's default coefficient 0), grouped GEMM; vocabulary 8192,
// one sequence of 512 tokens per step, fp32, dropout off.
//
// model/fwd_bwd/moecore: this package (tokens_per_s counter).
// model/fwd_bwd/pytorch: runs bench/torch_model.py with /usr/bin/python3 (the same model written
// in PyTorch, same sizes, torch threads = OMP_NUM_THREADS or 2) and reports its tokens/s and
// the ratio moecore / pytorch. Skipped with a message when the script or torch is missing.
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>

#include "moe/comm/parallel_state.h"
#include "moe/model/gpt_model.h"
#include "moe/tensor/rng.h"

namespace moe::model {
namespace {

constexpr int64_t kSeq = 512, kBatch = 1;
double moecore_tokens_per_s = 0;

TransformerConfig bench_config() {
  TransformerConfig c;
  c.num_layers = 4;
  c.hidden_size = 512;
  c.num_attention_heads = 8;
  c.group_query_attention = true;
  c.num_query_groups = 4;
  c.ffn_hidden_size = 1024;
  c.padded_vocab_size = 8192;
  c.seq_length = int(kSeq);
  c.normalization = "RMSNorm";
  c.position_embedding_type = "rope";
  c.swiglu = true;
  c.add_bias_linear = false;
  c.untie_embeddings_and_output_weights = true;
  c.hidden_dropout = c.attention_dropout = 0;
  c.num_experts = 8;
  c.moe.moe_router_topk = 2;
  c.moe.moe_grouped_gemm = true;
  return c;
}

Tensor random_tokens(int64_t vocab, uint64_t seed) {
  Rng rng(seed);
  Tensor t({kBatch, kSeq}, DType::I64);
  for (int64_t i = 0; i < t.numel(); ++i)
    t.data<int64_t>()[i] = int64_t(rng.below(uint64_t(vocab)));
  return t;
}

void BM_MoecoreForwardBackward(benchmark::State& state) {
  TransformerConfig config = bench_config();
  ParameterStore store(DType::F32);
  GPTModel model(config, comm::single_process_state(), store);
  store.allocate();
  model.init_parameters(1);
  Tensor tokens = random_tokens(config.padded_vocab_size, 2);
  Tensor labels = random_tokens(config.padded_vocab_size, 3);
  GPTContext warmup;
  model.forward(tokens, labels, warmup);
  model.backward(warmup);
  double seconds = 0;
  for (auto _ : state) {
    auto start = std::chrono::steady_clock::now();
    GPTContext ctx;
    benchmark::DoNotOptimize(model.forward(tokens, labels, ctx));
    model.backward(ctx);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  moecore_tokens_per_s = double(kSeq * kBatch) * double(state.iterations()) / seconds;
  state.counters["tokens_per_s"] = moecore_tokens_per_s;
}

void BM_PytorchForwardBackward(benchmark::State& state) {
  std::filesystem::path script = std::filesystem::path(__FILE__).parent_path() / "torch_model.py";
  if (!std::filesystem::exists(script) || !std::filesystem::exists("/usr/bin/python3")) {
    state.SkipWithError("bench/torch_model.py or /usr/bin/python3 not found");
    return;
  }
  std::string command = "/usr/bin/python3 " + script.string() + " --steps 5";
  double tokens_per_s = 0;
  for (auto _ : state) {
    std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(command.c_str(), "r"), pclose);
    if (!pipe) {
      state.SkipWithError("could not start /usr/bin/python3");
      return;
    }
    char line[512];
    while (fgets(line, sizeof(line), pipe.get()) != nullptr) {
      std::sscanf(line, "tokens_per_s %lf", &tokens_per_s);
    }
  }
  if (tokens_per_s <= 0) {
    state.SkipWithError("torch_model.py printed no tokens_per_s (is python3-torch installed?)");
    return;
  }
  state.counters["tokens_per_s"] = tokens_per_s;
  if (moecore_tokens_per_s > 0) {
    state.counters["moecore_over_pytorch"] = moecore_tokens_per_s / tokens_per_s;
  }
}

// moecore first: the PyTorch entry reports the ratio to it.
BENCHMARK(BM_MoecoreForwardBackward)
    ->Name("model/fwd_bwd/moecore")
    ->Iterations(5)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_PytorchForwardBackward)
    ->Name("model/fwd_bwd/pytorch")
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace moe::model

BENCHMARK_MAIN();
