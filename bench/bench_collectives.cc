// All-to-all-v throughput on 2 ranks, as the MoE token dispatcher uses it: token rows of hidden
// size 1024 (fp32, bf16) split evenly over the ranks. Three ways to move the same bytes, measured
// side by side in one run: moecore's all_to_all_v (announced and checked counts, deadline,
// point-to-point messages), raw MPI_Alltoallv on the same buffers, and a plain memcpy of the
// send buffer into the receive buffer (the single-process lower bound). Also moecore's
// deterministic all_reduce against MPI_Allreduce on the same fp32 bytes.
//
//   mpirun -np 2 build/bench/bench_collectives
//
// Every benchmark runs a fixed number of iterations, so both ranks run the same loops; rank 0
// reports, the other ranks stay silent.
#include <benchmark/benchmark.h>
#include <mpi.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "moe/comm/process_group.h"
#include "mpi_benchmark.h"

namespace {

constexpr int64_t kHidden = 1024;

struct Exchange {
  moe::Tensor send;                            // [tokens, kHidden]
  moe::Tensor recv;                            // [tokens, kHidden]
  std::vector<int64_t> rows;                   // rows to (and from) each rank: an even split
  std::vector<int> byte_counts, byte_offsets;  // the same split in bytes, for MPI_Alltoallv
};

Exchange make_exchange(const benchmark::State& state, const moe::comm::ProcessGroup& world) {
  const int64_t tokens = state.range(0);
  const moe::DType dtype = state.range(1) == 0 ? moe::DType::F32 : moe::DType::BF16;
  Exchange exchange{moe::Tensor::full({tokens, kHidden}, float(world.rank() + 1), dtype),
                    moe::Tensor({tokens, kHidden}, dtype),
                    {},
                    {},
                    {}};
  const int64_t row_bytes = kHidden * int64_t(moe::dtype_size(dtype));
  int64_t offset = 0;
  for (int peer = 0; peer < world.size(); ++peer) {
    const int64_t rows = tokens * (peer + 1) / world.size() - tokens * peer / world.size();
    exchange.rows.push_back(rows);
    exchange.byte_counts.push_back(int(rows * row_bytes));
    exchange.byte_offsets.push_back(int(offset * row_bytes));
    offset += rows;
  }
  return exchange;
}

void finish(benchmark::State& state, const Exchange& exchange) {
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(exchange.send.nbytes()));
  state.SetLabel(std::string(moe::dtype_name(exchange.send.dtype())));
}

void BM_AllToAllV_moecore(benchmark::State& state) {
  moe::comm::ProcessGroup world = moe::comm::ProcessGroup::world();
  Exchange exchange = make_exchange(state, world);
  moe::comm::barrier(world);
  for (auto _ : state) {
    moe::comm::all_to_all_v(exchange.send, exchange.rows, exchange.recv, exchange.rows, world);
  }
  finish(state, exchange);
}

void BM_AllToAllV_MPI(benchmark::State& state) {
  moe::comm::ProcessGroup world = moe::comm::ProcessGroup::world();
  Exchange exchange = make_exchange(state, world);
  MPI_Barrier(MPI_COMM_WORLD);
  for (auto _ : state) {
    MPI_Alltoallv(exchange.send.raw(), exchange.byte_counts.data(), exchange.byte_offsets.data(),
                  MPI_BYTE, exchange.recv.raw(), exchange.byte_counts.data(),
                  exchange.byte_offsets.data(), MPI_BYTE, MPI_COMM_WORLD);
  }
  finish(state, exchange);
}

// The data-parallel gradient reduction: an fp32 sum of the same bytes (in place; zeros, so the
// values stay finite). moecore sums in rank order; MPI picks its own algorithm and order.
void BM_AllReduce_moecore(benchmark::State& state) {
  moe::comm::ProcessGroup world = moe::comm::ProcessGroup::world();
  Exchange exchange = make_exchange(state, world);
  moe::comm::barrier(world);
  for (auto _ : state) moe::comm::all_reduce(exchange.recv, world);
  finish(state, exchange);
}

void BM_AllReduce_MPI(benchmark::State& state) {
  moe::comm::ProcessGroup world = moe::comm::ProcessGroup::world();
  Exchange exchange = make_exchange(state, world);
  MPI_Barrier(MPI_COMM_WORLD);
  for (auto _ : state) {
    MPI_Allreduce(MPI_IN_PLACE, exchange.recv.raw(), int(exchange.recv.numel()), MPI_FLOAT, MPI_SUM,
                  MPI_COMM_WORLD);
  }
  finish(state, exchange);
}

void BM_Memcpy(benchmark::State& state) {
  moe::comm::ProcessGroup world = moe::comm::ProcessGroup::world();
  Exchange exchange = make_exchange(state, world);
  MPI_Barrier(MPI_COMM_WORLD);  // all ranks copy at once, as they would exchange at once
  for (auto _ : state) {
    std::memcpy(exchange.recv.raw(), exchange.send.raw(), exchange.send.nbytes());
    benchmark::ClobberMemory();
  }
  finish(state, exchange);
}

// The median-time ratios of each pair of ways at equal sizes.
void print_ratios(const moe::bench::Medians& medians) {
  std::printf("\nmedian time ratios (moecore / other, same sizes, same run):\n");
  for (const auto& [name, seconds] : medians) {
    const size_t marker = name.find("_moecore");
    if (marker == std::string::npos) continue;
    const std::string operation = name.substr(0, marker);  // "BM_AllToAllV"
    const std::string sizes = name.substr(marker + std::string("_moecore").size());
    for (const std::string& other : {operation + "_MPI", std::string("BM_Memcpy")}) {
      if (other == "BM_Memcpy" && operation != "BM_AllToAllV") continue;
      auto found = medians.find(other + sizes);
      if (found == medians.end()) continue;
      std::printf("  %-22s / %-18s %-40s %.2f\n", name.substr(3, marker - 3).c_str(),
                  other.c_str() + 3, sizes.c_str(), seconds / found->second);
    }
  }
}

// For each size, the ways to move the same bytes one after the other (so they see the same
// machine load), each a fixed number of iterations repeated five times. Memcpy is compared with
// the all-to-all-v only; the all-reduce runs for fp32, the dtype MPI can sum.
void register_benchmarks() {
  using Function = void (*)(benchmark::State&);
  for (int64_t tokens : {256, 4096}) {
    for (int64_t bf16 : {0, 1}) {
      std::vector<std::pair<const char*, Function>> ways = {
          {"BM_AllToAllV_moecore", BM_AllToAllV_moecore},
          {"BM_AllToAllV_MPI", BM_AllToAllV_MPI},
          {"BM_Memcpy", BM_Memcpy}};
      if (bf16 == 0) {
        ways.push_back({"BM_AllReduce_moecore", BM_AllReduce_moecore});
        ways.push_back({"BM_AllReduce_MPI", BM_AllReduce_MPI});
      }
      for (auto [name, function] : ways) {
        moe::bench::register_fixed_iterations(name, function, tokens, bf16,
                                              tokens >= 4096 ? 40 : 300, benchmark::kMicrosecond);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  return moe::bench::run_mpi_benchmarks(argc, argv, register_benchmarks, print_ratios);
}
