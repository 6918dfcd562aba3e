// Checkpoints in Megatron's directory layout: <dir>/iter_0000100/ per saved iteration and the
// tracker file <dir>/latest_checkpointed_iteration.txt holding the latest iteration. Every tensor
// is stored under its global name with its full global shape and the box (offset + shape) and
// flat range this rank owns, so converters and layout-changing loaders need no format change
// (docs/checkpoint.md describes the files).
//
// Saving is atomic: every rank writes into <dir>/iter_0000100.tmp/, the ranks agree that all
// succeeded, then rank 0 renames the directory into place and rewrites the tracker last. A save
// that fails on any rank removes the temporary directory and throws on every rank; the previous
// checkpoint stays the latest. Loading checks sizes, shapes and CRC32 checksums and names the
// file and tensor in every error.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "moe/comm/parallel_state.h"
#include "moe/optim/lr_scheduler.h"
#include "moe/optim/optimizer.h"
#include "moe/tensor/crc32.h"
#include "moe/tensor/parameters.h"
#include "moe/tensor/rng.h"

namespace moe::checkpoint {

// Everything besides tensors that a resumed run needs.
struct TrainingState {
  int64_t iteration = 0;
  int64_t consumed_train_samples = 0;  // data position
  int64_t consumed_valid_samples = 0;
  nlohmann::json args = nlohmann::json::object();   // the run's arguments (rank 0's copy saved)
  nlohmann::json extra = nlohmann::json::object();  // free-form, rank 0's copy saved
  std::map<std::string, Rng::State> rng;            // THIS rank's generators, by purpose
  // Loaded: the saving run's world size (0 when RNG states were not loaded). A loading rank the
  // saving run did not have gets saving rank 0's generators: deterministic, and exactly the saved
  // state for generators that are the same on every rank (the trainer's).
  int rng_saved_world_size = 0;
};

struct SaveOptions {
  // Called on every rank after its files are written and before the ranks agree to commit; a
  // throw counts as that rank's failure (tests use it to simulate a crash mid-save).
  std::function<void()> before_commit;
};

// Collective over parallel.world. `optimizer` and `scheduler` may be null (not saved).
void save_checkpoint(const std::string& save_dir, const TrainingState& state,
                     const ParameterStore& model, optim::Optimizer* optimizer,
                     const optim::OptimizerParamScheduler* scheduler,
                     const comm::ParallelState& parallel, const SaveOptions& options = {});

// Megatron's upcycling (--moe-use-upcycling, core/transformer/moe/upcycling_utils.py): a dense
// model's checkpoint loaded into an MoE model. Every tensor the two models share loads by name;
// in each MoE layer, expert e is slice e % granularity of the layer's dense MLP (fc1's columns and
// fc2's rows; SwiGLU slices gate and up alike), fc1 (weights and bias) and fc2 weights scaled by
// s = a^(1/3) with SwiGLU, a^(1/2) otherwise, where a = granularity, or num_experts *
// granularity / topk with softmax before top-k; the fc2 bias is copied unscaled. The router keeps
// the model's initial weights, with expert e's column replaced by column e / granularity (the
// experts that make up one copy of the dense MLP score alike); shared experts keep their
// initial weights.
struct Upcycling {
  int granularity = 1;  // dense ffn size / expert ffn size
  int num_experts = 0;
  int topk = 1;
  bool pre_softmax = false;  // --moe-router-pre-softmax
  bool swiglu = false;
};

struct LoadOptions {
  bool load_optim = true;  // false: --no-load-optim (optimizer and scheduler keep their state)
  bool load_rng = true;    // false: --no-load-rng (state.rng comes back empty)
  std::optional<int64_t> iteration;  // default: the tracker's iteration
  // Every model tensor in the checkpoint must go into some rank's model (false: load a part).
  bool strict = true;
  // Set: the checkpoint is a dense model's, upcycled into this MoE model (model tensors only;
  // load_optim and load_rng must be false).
  std::optional<Upcycling> upcycling;
};

// Collective over parallel.world. Loads the model and, unless disabled, the optimizer state and
// scheduler, into any layout whose tensors have the saved global shapes (different tp / ep / pp /
// dp, distributed optimizer on or off, one process): each rank assembles its boxes and flat
// ranges from whatever pieces the saving ranks stored, and RNG states at any world size.
// Returns the saved TrainingState (rng empty with load_rng false).
TrainingState load_checkpoint(const std::string& load_dir, ParameterStore& model,
                              optim::Optimizer* optimizer,
                              optim::OptimizerParamScheduler* scheduler,
                              const comm::ParallelState& parallel, const LoadOptions& options = {});

// The tracker's iteration, or nullopt when <dir>/latest_checkpointed_iteration.txt is absent.
// Throws naming the file when it holds anything but an iteration number.
std::optional<int64_t> read_tracker(const std::string& dir);
// "iter_0000100"
std::string iteration_dir_name(int64_t iteration);

}  // namespace moe::checkpoint
