// Megatron-Core's model-parallel layout. Dense layers order ranks tp-cp-dp-pp (tp fastest);
// expert layers order them etp-ep-edp-pp, where expert-dp = world / (etp * ep * pp). Pipeline
// groups are shared by both.
#pragma once

#include <string>
#include <vector>

#include "moe/comm/process_group.h"

namespace moe::comm {

struct ParallelSizes {
  int tp = 1;   // tensor model parallel
  int pp = 1;   // pipeline model parallel
  int ep = 1;   // expert model parallel
  int etp = 1;  // expert tensor parallel
  int cp = 1;   // context parallel
};

// A rank's place in a tensor-parallel region: the tp group (the self group without tensor
// parallelism) and whether activations outside the region are split by sequence.
struct TensorParallel {
  ProcessGroup group;
  bool sequence_parallel = false;

  int size() const { return group.size(); }
  int rank() const { return group.rank(); }
};

// A rank's place in context parallelism, Megatron's load-balanced split
// (get_batch_on_this_cp_rank): the sequence is cut into 2 * cp chunks and cp rank r holds chunks
// r and 2 * cp - 1 - r, so every rank has the same share of the causal attention work.
// tp_cp_group: the tensor x context ranks, which hold the shards of the same sequences (the MoE
// aux-loss token counts and the z-loss scale are over it, as Megatron's router tp_cp_group).
// Default: no context parallelism (self groups).
struct ContextParallel {
  ProcessGroup group;
  ProcessGroup tp_cp_group;

  int size() const { return group.size(); }
  int rank() const { return group.rank(); }
  // The global sequence position of index `local` of this rank's `local_seq` positions
  // (local_seq = seq / cp: two chunks of local_seq / 2).
  int64_t global_position(int64_t local, int64_t local_seq) const;
  // Every local index's global position, [local_seq].
  std::vector<int64_t> global_positions(int64_t local_seq) const;
};

struct ParallelState {
  ParallelSizes sizes;
  int world_size = 1;
  int world_rank = 0;
  int dp = 1;   // data parallel = world / (tp * cp * pp)
  int edp = 1;  // expert data parallel = world / (etp * ep * pp)

  // Group names (ProcessGroup::name) in brackets. Dense: tensor ["tp"], pipeline ["pp"], data
  // ["dp"], data with context ["dp_cp"], tensor x data x context (every rank of a pipeline
  // stage; Megatron's tensor-and-data-parallel group with context) ["tp_dp_cp"], context ["cp"],
  // tensor x pipeline ["model_parallel"], first and last stage ["embedding"]. Expert: expert model
  // ["ep"], expert tensor ["etp"], expert data ["expert_dp"], expert tensor x expert model
  // ["tp_ep"], which the token dispatchers exchange over (Megatron's
  // expert-tensor-and-model-parallel group). Tensor x context ["tp_cp"].
  ProcessGroup world;
  ProcessGroup tp_group, pp_group, dp_group, dp_cp_group, tp_dp_cp_group, cp_group, tp_cp_group,
      model_parallel_group, embedding_group;
  ProcessGroup ep_group, etp_group, expert_dp_group, tp_ep_group;
  // Megatron's embedding group holds the first and last pipeline stage; ranks of middle stages
  // are not in it (their `embedding_group` is a self group).
  bool in_embedding_group = true;

  bool is_pipeline_first() const { return pp_group.rank() == 0; }
  bool is_pipeline_last() const { return pp_group.rank() == pp_group.size() - 1; }
  ContextParallel context_parallel() const { return {cp_group, tp_cp_group}; }
};

// Builds every group on MPI_COMM_WORLD. Throws moe::Error naming the sizes when the world size
// does not factor (e.g. "world_size (6) is not divisible by tp (4) x pp (1) x cp (1)").
ParallelState initialize_model_parallel(const ParallelSizes& sizes);
// The same layout on one process: every group is the self group (sizes must all be 1).
ParallelState single_process_state();

// Every group of every kind as lists of world ranks (group rank i = list[i]), computed as
// Megatron's RankGenerator does. Throws like initialize_model_parallel for sizes that do not
// factor.
struct RankLayout {
  ParallelSizes sizes;
  int world_size = 1;
  int dp = 1;
  int edp = 1;
  using Groups = std::vector<std::vector<int>>;
  Groups tp, pp, dp_group, dp_cp, tp_dp_cp, cp_group, tp_cp, model_parallel, embedding;
  Groups ep_group, etp_group, expert_dp, tp_ep;
};
RankLayout compute_rank_layout(int world_size, const ParallelSizes& sizes);

// Rank tables for a world size, without MPI (for tests and --help output): one line per group
// kind, each group as a list of world ranks.
std::string describe_rank_layout(int world_size, const ParallelSizes& sizes);

}  // namespace moe::comm
