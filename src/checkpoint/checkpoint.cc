#include "moe/checkpoint/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "moe/comm/boxes.h"
#include "moe/comm/fault_injection.h"
#include "upcycling.h"

namespace moe::checkpoint {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kTrackerName = "latest_checkpointed_iteration.txt";
constexpr const char* kMetadataName = "metadata.json";
constexpr const char* kFormat = "moecore-checkpoint";
constexpr int kVersion = 1;
constexpr const char* kOptimizerPrefix = "optimizer.";

std::string rank_stem(int rank) {
  char name[32];
  std::snprintf(name, sizeof(name), "rank_%05d", rank);
  return name;
}

// One stored tensor piece: elements [flat_begin, flat_end) (row-major) of the box at `offset`
// with `shape` inside the global tensor `name`.
struct Piece {
  std::string name;
  DType dtype = DType::F32;
  Shape global_shape, offset, shape;
  int64_t flat_begin = 0, flat_end = 0;
  int64_t file_offset = 0, nbytes = 0;
  uint32_t crc = 0;
  std::string file;  // the data file's path (set when loading)
};

json to_json(const Piece& p) {
  return {{"name", p.name},
          {"dtype", dtype_name(p.dtype)},
          {"global_shape", p.global_shape},
          {"offset", p.offset},
          {"shape", p.shape},
          {"flat_range", {p.flat_begin, p.flat_end}},
          {"file_offset", p.file_offset},
          {"nbytes", p.nbytes},
          {"crc32", p.crc}};
}

Piece piece_from_json(const json& j, const std::string& file) {
  Piece p;
  p.name = j.at("name").get<std::string>();
  p.dtype = parse_dtype(j.at("dtype").get<std::string>());
  p.global_shape = j.at("global_shape").get<Shape>();
  p.offset = j.at("offset").get<Shape>();
  p.shape = j.at("shape").get<Shape>();
  p.flat_begin = j.at("flat_range").at(0).get<int64_t>();
  p.flat_end = j.at("flat_range").at(1).get<int64_t>();
  p.file_offset = j.at("file_offset").get<int64_t>();
  p.nbytes = j.at("nbytes").get<int64_t>();
  p.crc = j.at("crc32").get<uint32_t>();
  p.file = file;
  MOE_CHECK(p.offset.size() == p.global_shape.size() && p.shape.size() == p.global_shape.size() &&
                p.flat_begin >= 0 && p.flat_begin <= p.flat_end &&
                p.flat_end <= shape_numel(p.shape) &&
                p.nbytes == (p.flat_end - p.flat_begin) * int64_t(dtype_size(p.dtype)),
            "index entry of tensor '", p.name, "' is inconsistent (box ", shape_string(p.offset),
            " + ", shape_string(p.shape), " in ", shape_string(p.global_shape), ", range [",
            p.flat_begin, ", ", p.flat_end, "), ", p.nbytes, " bytes)");
  return p;
}

// A file written with stdio and fsync'ed, so a committed checkpoint survives a crash.
class DurableFile {
 public:
  explicit DurableFile(fs::path path) : path_(std::move(path)) {
    file_ = std::fopen(path_.c_str(), "wb");
    MOE_CHECK(file_ != nullptr, "cannot create checkpoint file ", path_, ": ",
              std::strerror(errno));
  }
  ~DurableFile() {
    if (file_ != nullptr) std::fclose(file_);
  }
  DurableFile(const DurableFile&) = delete;
  DurableFile& operator=(const DurableFile&) = delete;

  void write(const void* data, size_t size) {
    MOE_CHECK(size == 0 || std::fwrite(data, 1, size, file_) == size, "writing checkpoint file ",
              path_, " failed: ", std::strerror(errno));
    written_ += int64_t(size);
  }
  int64_t written() const { return written_; }
  void close() {
    bool ok = std::fflush(file_) == 0 && ::fsync(fileno(file_)) == 0;
    int error = errno;
    ok = std::fclose(file_) == 0 && ok;
    file_ = nullptr;
    MOE_CHECK(ok, "finishing checkpoint file ", path_, " failed: ", std::strerror(error));
  }

 private:
  fs::path path_;
  std::FILE* file_ = nullptr;
  int64_t written_ = 0;
};

void write_text(const fs::path& path, const std::string& text) {
  DurableFile file(path);
  file.write(text.data(), text.size());
  file.close();
}

std::string read_text(const fs::path& path) {
  MOE_CHECK(fs::exists(path), "missing checkpoint file ", path);
  std::ifstream in(path, std::ios::binary);
  MOE_CHECK(in.good(), "cannot open checkpoint file ", path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

json parse_json(const std::string& text, const fs::path& path) {
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    throw Error(detail::concat("checkpoint file ", path,
                               " is not valid JSON (truncated or corrupted?): ", e.what()));
  }
}

// Runs `action`, returning its error message ("" on success), so ranks can agree on failures.
template <class Action>
std::string attempt(Action&& action) {
  try {
    action();
    return "";
  } catch (const std::exception& e) {
    return e.what();
  }
}

// Collective: throws on every rank when any rank's `local_error` is non-empty, naming the ranks.
void agree(const comm::ProcessGroup& world, const std::string& local_error,
           const std::string& what) {
  const comm::FailedRanks failed = comm::gather_failed_ranks(!local_error.empty(), world);
  if (failed.ranks.empty()) return;
  throw Error(what + " failed on rank(s) " + failed.list() +
              (local_error.empty() ? " (see that rank's error)" : ": " + local_error));
}

json layout_json(const comm::ParallelState& p) {
  return {{"world_size", p.world_size}, {"tp", p.sizes.tp}, {"pp", p.sizes.pp}, {"ep", p.sizes.ep},
          {"etp", p.sizes.etp},         {"cp", p.sizes.cp}, {"dp", p.dp},       {"edp", p.edp}};
}

json coordinates_json(const comm::ParallelState& p) {
  return {{"tp", p.tp_group.rank()},        {"pp", p.pp_group.rank()}, {"dp", p.dp_group.rank()},
          {"cp", p.cp_group.rank()},        {"ep", p.ep_group.rank()}, {"etp", p.etp_group.rank()},
          {"edp", p.expert_dp_group.rank()}};
}

// Replicas of a parameter (data-parallel copies, tensor-parallel duplicates, a pipeline stage's
// copy of another stage's parameter) store it once.
bool stores_replicated_param(const ParamSpec& spec, const comm::ParallelState& p,
                             bool sharded_over_replicas) {
  if (spec.pipeline_copy) return false;
  bool dense = spec.group == ParamGroup::kDense;
  const comm::ProcessGroup& replicas = dense ? p.dp_cp_group : p.expert_dp_group;
  const comm::ProcessGroup& tp = dense ? p.tp_group : p.etp_group;
  if (!sharded_over_replicas && replicas.rank() != 0) return false;
  return !spec.tensor_parallel_duplicate || tp.rank() == 0;
}

struct PendingPiece {
  Piece piece;
  Tensor data;  // contiguous, piece.dtype
};

PendingPiece pending_piece(std::string name, const ParamSpec& spec, int64_t flat_begin,
                           int64_t flat_end, Tensor data) {
  Piece piece;
  piece.name = std::move(name);
  piece.dtype = data.dtype();
  piece.global_shape = spec.global_shape;
  piece.offset = spec.global_offset;
  piece.shape = spec.shape;
  piece.flat_begin = flat_begin;
  piece.flat_end = flat_end;
  return {std::move(piece), std::move(data)};
}

std::vector<PendingPiece> pieces_to_save(const ParameterStore& model, optim::Optimizer* optimizer,
                                         const comm::ParallelState& p) {
  std::vector<PendingPiece> out;
  for (int i = 0; i < model.count(); ++i) {
    const ParamSpec& spec = model.spec(ParamHandle{i});
    if (!stores_replicated_param(spec, p, false)) continue;
    Tensor data = model.param(ParamHandle{i});
    out.push_back(pending_piece(spec.name, spec, 0, data.numel(), data));
  }
  if (optimizer == nullptr) return out;
  bool sharded = optimizer->config().use_distributed_optimizer;
  for (const optim::StateTensor& s : optimizer->state_tensors()) {
    const ParamSpec& spec = model.spec(s.param);
    if (!stores_replicated_param(spec, p, sharded)) continue;
    out.push_back(pending_piece(kOptimizerPrefix + s.kind + "/" + spec.name, spec, s.flat_begin,
                                s.flat_end, s.data));
  }
  return out;
}

json rng_to_json(const std::map<std::string, Rng::State>& rng) {
  json out = json::object();
  for (const auto& [name, state] : rng) out[name] = state;
  return out;
}

json scheduler_to_json(const optim::SchedulerState& s) {
  return {{"max_lr", s.max_lr},
          {"min_lr", s.min_lr},
          {"lr_warmup_steps", s.warmup_steps},
          {"lr_decay_steps", s.decay_steps},
          {"lr_decay_style", s.decay_style},
          {"start_wd", s.start_wd},
          {"end_wd", s.end_wd},
          {"wd_incr_steps", s.wd_incr_steps},
          {"wd_incr_style", s.wd_incr_style},
          {"num_steps", s.num_steps}};
}

optim::SchedulerState scheduler_from_json(const json& j) {
  optim::SchedulerState s;
  s.max_lr = j.at("max_lr").get<double>();
  s.min_lr = j.at("min_lr").get<double>();
  s.warmup_steps = j.at("lr_warmup_steps").get<double>();
  s.decay_steps = j.at("lr_decay_steps").get<int64_t>();
  s.decay_style = j.at("lr_decay_style").get<std::string>();
  s.start_wd = j.at("start_wd").get<double>();
  s.end_wd = j.at("end_wd").get<double>();
  s.wd_incr_steps = j.at("wd_incr_steps").get<int64_t>();
  s.wd_incr_style = j.at("wd_incr_style").get<std::string>();
  s.num_steps = j.at("num_steps").get<int64_t>();
  return s;
}

json optimizer_to_json(optim::Optimizer& optimizer) {
  const optim::OptimizerConfig& c = optimizer.config();
  optim::OptimizerScalars s = optimizer.scalars();
  return {{"optimizer", c.optimizer},
          {"use_distributed_optimizer", c.use_distributed_optimizer},
          {"step", s.step},
          {"loss_scale", s.scaler.scale},
          {"growth_tracker", s.scaler.growth_tracker},
          {"hysteresis_tracker", s.scaler.hysteresis_tracker}};
}

struct RankFiles {
  int64_t index_crc = 0;
  int64_t data_bytes = 0;
};

// Writes rank_NNNNN.bin (the tensor bytes back to back) and rank_NNNNN.json (their index).
RankFiles write_rank_files(const fs::path& dir, const TrainingState& state,
                           const ParameterStore& model, optim::Optimizer* optimizer,
                           const comm::ParallelState& p) {
  std::string stem = rank_stem(p.world_rank);
  std::vector<PendingPiece> pieces = pieces_to_save(model, optimizer, p);
  DurableFile data(dir / (stem + ".bin"));
  json entries = json::array();
  for (PendingPiece& pending : pieces) {
    Piece& piece = pending.piece;
    piece.file_offset = data.written();
    piece.nbytes = int64_t(pending.data.nbytes());
    piece.crc = crc32(pending.data.raw(), pending.data.nbytes());
    data.write(pending.data.raw(), pending.data.nbytes());
    entries.push_back(to_json(piece));
  }
  data.close();
  json index = {{"format", std::string(kFormat) + "-rank"},
                {"version", kVersion},
                {"rank", p.world_rank},
                {"iteration", state.iteration},
                {"data_file", stem + ".bin"},
                {"data_bytes", data.written()},
                {"coordinates", coordinates_json(p)},
                {"rng", rng_to_json(state.rng)},
                {"tensors", entries}};
  std::string text = index.dump(1);
  write_text(dir / (stem + ".json"), text);
  return {int64_t(crc32(text.data(), text.size())), data.written()};
}

void write_metadata(const fs::path& dir, const TrainingState& state, const ParameterStore& model,
                    optim::Optimizer* optimizer, const optim::OptimizerParamScheduler* scheduler,
                    const comm::ParallelState& p, const std::vector<int64_t>& rank_info) {
  json ranks = json::array();
  for (int r = 0; r < p.world_size; ++r) {
    ranks.push_back({{"rank", r},
                     {"index", rank_stem(r) + ".json"},
                     {"index_crc32", rank_info[3 * r + 1]},
                     {"data", rank_stem(r) + ".bin"},
                     {"data_bytes", rank_info[3 * r + 2]}});
  }
  json meta = {{"format", kFormat},
               {"version", kVersion},
               {"iteration", state.iteration},
               {"layout", layout_json(p)},
               {"param_dtype", dtype_name(model.param_dtype())},
               {"consumed_train_samples", state.consumed_train_samples},
               {"consumed_valid_samples", state.consumed_valid_samples},
               {"args", state.args},
               {"extra", state.extra},
               {"optimizer", optimizer ? optimizer_to_json(*optimizer) : json(nullptr)},
               {"scheduler", scheduler ? scheduler_to_json(scheduler->state()) : json(nullptr)},
               {"ranks", ranks}};
  write_text(dir / kMetadataName, meta.dump(1));
}

fs::path with_suffix(const fs::path& dir, const char* suffix) {
  fs::path out = dir;
  out += suffix;
  return out;
}

// Makes renames inside `dir` durable.
void sync_directory(const fs::path& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  MOE_CHECK(fd >= 0, "cannot open directory ", dir, ": ", std::strerror(errno));
  bool ok = ::fsync(fd) == 0;
  int error = errno;
  ::close(fd);
  MOE_CHECK(ok, "syncing directory ", dir, " failed: ", std::strerror(error));
}

// Removes the temporary directories that interrupted saves left (iter_NNNNNNN.tmp).
void remove_stale_temporaries(const fs::path& root) {
  for (const fs::directory_entry& entry : fs::directory_iterator(root)) {
    std::string name = entry.path().filename().string();
    bool stale = entry.is_directory() && name.size() == 16 && name.starts_with("iter_") &&
                 name.ends_with(".tmp") && name.find_first_not_of("0123456789", 5) == 12;
    if (stale) fs::remove_all(entry.path());
  }
}

// Moves the finished temporary directory into place, then points the tracker at it. Re-saving
// an existing iteration parks the old copy as iter_NNNNNNN.old until the new one is in place;
// loading falls back to it if a crash came in between.
void commit(const fs::path& root, const fs::path& tmp, const fs::path& final_dir,
            int64_t iteration) {
  sync_directory(tmp);  // every rank's files (fsync'ed by their writers) are listed
  fs::path old = with_suffix(final_dir, ".old");
  if (!fs::exists(final_dir) && fs::exists(old)) fs::rename(old, final_dir);
  fs::remove_all(old);
  if (fs::exists(final_dir)) fs::rename(final_dir, old);
  fs::rename(tmp, final_dir);
  fs::remove_all(old);
  sync_directory(root);  // the directory is in place before the tracker names it
  fs::path tracker_tmp = root / (std::string(kTrackerName) + ".tmp");
  write_text(tracker_tmp, std::to_string(iteration));
  fs::rename(tracker_tmp, root / kTrackerName);
  sync_directory(root);
}

}  // namespace

std::string iteration_dir_name(int64_t iteration) {
  MOE_CHECK(iteration >= 0, "checkpoint iteration must be >= 0, got ", iteration);
  char name[32];
  std::snprintf(name, sizeof(name), "iter_%07lld", static_cast<long long>(iteration));
  return name;
}

std::optional<int64_t> read_tracker(const std::string& dir) {
  fs::path path = fs::path(dir) / kTrackerName;
  if (!fs::exists(path)) return std::nullopt;
  std::string text = read_text(path);
  size_t end = text.find_last_not_of(" \t\r\n");
  text = end == std::string::npos ? "" : text.substr(0, end + 1);
  bool digits = !text.empty() && text.find_first_not_of("0123456789") == std::string::npos &&
                text.size() < 19;
  MOE_CHECK(digits, "tracker file ", path, " should hold an iteration number but holds '", text,
            "'", text == "release" ? " (release checkpoints are not supported)" : "");
  return std::stoll(text);
}

void save_checkpoint(const std::string& save_dir, const TrainingState& state,
                     const ParameterStore& model, optim::Optimizer* optimizer,
                     const optim::OptimizerParamScheduler* scheduler,
                     const comm::ParallelState& parallel, const SaveOptions& options) {
  const comm::ProcessGroup& world = parallel.world;
  std::vector<int64_t> iterations = comm::all_gather_values({&state.iteration, 1}, world);
  for (size_t r = 0; r < iterations.size(); ++r) {
    MOE_CHECK(iterations[r] == iterations[0], "ranks disagree on the iteration to save in '",
              save_dir, "': rank 0 has ", iterations[0], ", rank ", r, " has ", iterations[r]);
  }
  fs::path root(save_dir);
  fs::path final_dir = root / iteration_dir_name(state.iteration);
  fs::path tmp = with_suffix(final_dir, ".tmp");
  std::string what = detail::concat("saving checkpoint ", final_dir);
  bool leader = world.rank() == 0;

  std::string error;
  if (leader) {
    error = attempt([&] {
      fs::create_directories(root);
      remove_stale_temporaries(root);
      fs::create_directory(tmp);
    });
  }
  agree(world, error, what);

  RankFiles files;
  error = attempt([&] {
    files = write_rank_files(tmp, state, model, optimizer, parallel);
    comm::fault_point("save");  // between this rank's files and the commit
    if (options.before_commit) options.before_commit();
  });
  int64_t report[3] = {error.empty() ? 0 : 1, files.index_crc, files.data_bytes};
  std::vector<int64_t> reports = comm::all_gather_values(report, world);
  bool all_written = true;
  for (int r = 0; r < world.size(); ++r) all_written = all_written && reports[3 * r] == 0;
  if (!all_written) {
    std::string cleanup;
    if (leader) cleanup = attempt([&] { fs::remove_all(tmp); });
    comm::barrier(world);
    agree(world, error.empty() ? cleanup : error, what + " (the previous checkpoint is unchanged)");
  }

  if (leader) {
    error = attempt([&] {
      write_metadata(tmp, state, model, optimizer, scheduler, parallel, reports);
      commit(root, tmp, final_dir, state.iteration);
    });
  }
  agree(world, error, what);
}

namespace {

// Every rank's index, by tensor name.
class Catalog {
 public:
  Catalog(const fs::path& dir, const json& meta) {
    for (const json& rank : meta.at("ranks")) {
      fs::path index_path = dir / rank.at("index").get<std::string>();
      fs::path data_path = dir / rank.at("data").get<std::string>();
      std::string text = read_text(index_path);
      int64_t crc = crc32(text.data(), text.size());
      MOE_CHECK(crc == rank.at("index_crc32").get<int64_t>(), "checkpoint index ", index_path,
                " is corrupted (crc32 ", crc, ", metadata says ",
                rank.at("index_crc32").get<int64_t>(), ")");
      json index = parse_json(text, index_path);
      MOE_CHECK(fs::exists(data_path), "missing checkpoint file ", data_path);
      int64_t size = int64_t(fs::file_size(data_path));
      int64_t expected = rank.at("data_bytes").get<int64_t>();
      MOE_CHECK(size == expected, "checkpoint file ", data_path,
                size < expected ? " is truncated: " : " has the wrong size: ", size,
                " bytes, the metadata says ", expected);
      for (const json& entry : index.at("tensors")) {
        Piece piece = piece_from_json(entry, data_path.string());
        by_name_[piece.name].push_back(std::move(piece));
      }
      rng_.push_back(index.at("rng"));
    }
  }

  const std::vector<Piece>& pieces(const std::string& name) const {
    static const std::vector<Piece> none;
    auto it = by_name_.find(name);
    return it == by_name_.end() ? none : it->second;
  }
  const json& rng(int rank) const { return rng_.at(size_t(rank)); }
  // Model tensors (not optimizer state), sorted by name.
  std::vector<std::string> model_tensor_names() const {
    std::vector<std::string> names;
    for (const auto& [name, pieces] : by_name_) {
      if (!name.starts_with(kOptimizerPrefix)) names.push_back(name);
    }
    return names;
  }

 private:
  std::map<std::string, std::vector<Piece>> by_name_;
  std::vector<json> rng_;
};

// The piece's elements, checksummed, as a tensor [flat_end - flat_begin] of its dtype.
Tensor read_piece(const Piece& piece) {
  Tensor out = Tensor::empty({piece.flat_end - piece.flat_begin}, piece.dtype);
  std::ifstream in(piece.file, std::ios::binary);
  MOE_CHECK(in.good(), "cannot open checkpoint file ", piece.file, " for tensor '", piece.name,
            "'");
  in.seekg(piece.file_offset);
  in.read(static_cast<char*>(out.raw()), std::streamsize(piece.nbytes));
  MOE_CHECK(in.gcount() == piece.nbytes, "checkpoint file ", piece.file, " is truncated: tensor '",
            piece.name, "' needs bytes [", piece.file_offset, ", ",
            piece.file_offset + piece.nbytes, ")");
  uint32_t crc = crc32(out.raw(), out.nbytes());
  MOE_CHECK(crc == piece.crc, "checksum mismatch for tensor '", piece.name, "' in file ",
            piece.file, " (crc32 ", crc, ", index says ", piece.crc, "): the file is corrupted");
  return out;
}

// The box a stored piece belongs to; pieces of one box tile it with their flat ranges.
using Box = std::pair<Shape, Shape>;  // offset, shape

// A stored box assembled from all its pieces, as a tensor of the box's shape.
Tensor assemble_box(const std::vector<const Piece*>& pieces, const std::string& name,
                    const fs::path& dir) {
  const Piece& first = *pieces.front();
  Tensor box = Tensor::empty(first.shape, first.dtype);
  Tensor flat = box.reshape({-1});
  int64_t covered = 0;
  for (const Piece* piece : pieces) {
    flat.rows(piece->flat_begin, piece->flat_end)
        .copy_from(read_piece(*piece));  // converts a differing dtype
    covered += piece->flat_end - piece->flat_begin;
  }
  MOE_CHECK(covered == box.numel(), "checkpoint ", dir, " holds ", covered, " of the ", box.numel(),
            " elements of the box at ", shape_string(first.offset), " of tensor '", name, "'");
  return box;
}

// Fills `target`, elements [flat_begin, flat_end) (row-major) of this rank's box of the global
// tensor `name` (spec.global_offset + spec.shape), from whatever boxes and ranges the checkpoint
// stored it in: ranges of the same box are copied directly, other boxes are assembled and their
// overlap copied, so any layout loads any other with the same global shapes.
void load_tensor(const Catalog& catalog, const std::string& name, const ParamSpec& spec,
                 int64_t flat_begin, int64_t flat_end, Tensor target, const fs::path& dir) {
  const std::vector<Piece>& pieces = catalog.pieces(name);
  MOE_CHECK(!pieces.empty(), "tensor '", name, "' is missing from checkpoint ", dir);
  std::map<Box, std::vector<const Piece*>> boxes;
  for (const Piece& piece : pieces) {
    MOE_CHECK(piece.global_shape == spec.global_shape, "tensor '", name, "' has global shape ",
              shape_string(piece.global_shape), " in checkpoint file ", piece.file,
              " but the model has ", shape_string(spec.global_shape));
    if (comm::boxes_overlap(piece.offset, piece.shape, spec.global_offset, spec.shape)) {
      boxes[{piece.offset, piece.shape}].push_back(&piece);
    }
  }
  target = target.reshape({-1});
  const bool whole_target = flat_begin == 0 && flat_end == shape_numel(spec.shape);
  Tensor staging;  // this rank's whole box, when another box feeds a partial range
  int64_t covered = 0, staged = 0;
  for (const auto& [box, box_pieces] : boxes) {
    if (box.first == spec.global_offset && box.second == spec.shape) {
      for (const Piece* piece : box_pieces) {
        int64_t begin = std::max(piece->flat_begin, flat_begin);
        int64_t end = std::min(piece->flat_end, flat_end);
        if (begin >= end) continue;
        Tensor stored = read_piece(*piece);
        target.rows(begin - flat_begin, end - flat_begin)
            .copy_from(stored.rows(begin - piece->flat_begin, end - piece->flat_begin));
        covered += end - begin;
      }
      continue;
    }
    Tensor stored = assemble_box(box_pieces, name, dir);
    if (whole_target) {
      Tensor into = target.reshape(spec.shape);
      covered += comm::copy_box_overlap(stored, box.first, into, spec.global_offset);
    } else {
      if (!staging.defined()) staging = Tensor(spec.shape, target.dtype());
      staged += comm::copy_box_overlap(stored, box.first, staging, spec.global_offset);
    }
  }
  if (staging.defined()) {
    MOE_CHECK(staged == staging.numel(), "checkpoint ", dir, " covers ", staged, " of the ",
              staging.numel(), " elements of tensor '", name, "' at offset ",
              shape_string(spec.global_offset), " shape ", shape_string(spec.shape));
    target.copy_from(staging.reshape({-1}).rows(flat_begin, flat_end));
    covered += flat_end - flat_begin;
  }
  MOE_CHECK(covered == flat_end - flat_begin, "checkpoint ", dir, " covers ", covered, " of the ",
            flat_end - flat_begin, " elements of tensor '", name, "' at offset ",
            shape_string(spec.global_offset), " shape ", shape_string(spec.shape));
}

void load_optimizer_state(const Catalog& catalog, const json& meta, const ParameterStore& model,
                          optim::Optimizer& optimizer, const fs::path& dir) {
  const json& saved = meta.at("optimizer");
  MOE_CHECK(!saved.is_null(), "checkpoint ", dir, " holds no optimizer state; use --no-load-optim");
  const optim::OptimizerConfig& config = optimizer.config();
  std::string saved_name = saved.at("optimizer").get<std::string>();
  MOE_CHECK(saved_name == config.optimizer, "checkpoint ", dir, " holds ", saved_name,
            " state but this run uses --optimizer ", config.optimizer, "; use --no-load-optim");
  for (const optim::StateTensor& s : optimizer.state_tensors()) {
    const ParamSpec& spec = model.spec(s.param);
    std::string name = kOptimizerPrefix + s.kind + "/" + spec.name;
    // Runs whose fp32 parameters are their own main copy save none; the main parameters then
    // come from the loaded model (reload_main_params above).
    if (s.kind == "main_param" && catalog.pieces(name).empty()) continue;
    load_tensor(catalog, name, spec, s.flat_begin, s.flat_end, s.data, dir);
  }
  optim::OptimizerScalars scalars;
  scalars.step = saved.at("step").get<int64_t>();
  scalars.scaler.scale = saved.at("loss_scale").get<double>();
  scalars.scaler.growth_tracker = saved.at("growth_tracker").get<int64_t>();
  scalars.scaler.hysteresis_tracker = saved.at("hysteresis_tracker").get<int64_t>();
  optimizer.set_scalars(scalars);
}

// One MoE model parameter from a dense checkpoint (Upcycling in checkpoint.h). Returns the name
// of the checkpoint tensor it came from, "" when it keeps its initial value.
std::string load_upcycled(const Catalog& catalog, const ParamSpec& spec, const Upcycling& settings,
                          Tensor param, const fs::path& dir) {
  const upcycling::UpcycledSource source = upcycling::upcycled_source(spec.name);
  switch (source.kind) {
    case upcycling::UpcycledSource::kSameName:
      load_tensor(catalog, spec.name, spec, 0, shape_numel(spec.shape), param, dir);
      return spec.name;
    case upcycling::UpcycledSource::kKeepInitialised:
      return "";
    case upcycling::UpcycledSource::kRouter:
      upcycling::repeat_router_columns(spec, settings, param);
      return "";
    case upcycling::UpcycledSource::kExpert:
      break;
  }
  const std::vector<Piece>& pieces = catalog.pieces(source.dense_name);
  MOE_CHECK(!pieces.empty(), "--moe-use-upcycling: checkpoint ", dir, " has no '",
            source.dense_name, "' to make the experts '", spec.name,
            "' from (is it a dense model's checkpoint?)");
  ParamSpec whole;  // the dense tensor, whole
  whole.name = source.dense_name;
  whole.shape = whole.global_shape = pieces.front().global_shape;
  whole.global_offset = Shape(whole.shape.size(), 0);
  Tensor dense(whole.shape, DType::F64);
  load_tensor(catalog, whole.name, whole, 0, shape_numel(whole.shape), dense, dir);
  upcycling::fill_expert_from_dense(spec, dense, source, settings, param);
  return source.dense_name;
}

struct LocalLoad {
  TrainingState state;
  fs::path dir;
  std::vector<std::string> stored;  // the checkpoint's model tensors
  std::vector<int64_t> loaded;      // 1 where this rank's model has that tensor
};

LocalLoad load_on_this_rank(const std::string& load_dir, ParameterStore& model,
                            optim::Optimizer* optimizer, optim::OptimizerParamScheduler* scheduler,
                            const comm::ParallelState& p, const LoadOptions& options) {
  MOE_CHECK(!options.upcycling || (!options.load_optim && !options.load_rng),
            "upcycling a dense checkpoint loads the model only (load_optim and load_rng false)");
  std::optional<int64_t> iteration = options.iteration;
  if (!iteration) iteration = read_tracker(load_dir);
  MOE_CHECK(iteration.has_value(), "no checkpoint to load: tracker file ",
            fs::path(load_dir) / kTrackerName, " does not exist");
  fs::path dir = fs::path(load_dir) / iteration_dir_name(*iteration);
  if (!fs::is_directory(dir) && fs::is_directory(with_suffix(dir, ".old"))) {
    dir = with_suffix(dir, ".old");  // a re-save of this iteration was cut off mid-commit
  }
  MOE_CHECK(fs::is_directory(dir), "checkpoint directory ", dir, " does not exist");
  fs::path meta_path = dir / kMetadataName;
  json meta = parse_json(read_text(meta_path), meta_path);
  LocalLoad local;
  local.dir = dir;
  TrainingState& state = local.state;
  try {
    MOE_CHECK(meta.at("format") == kFormat && meta.at("version") == kVersion,
              "unknown checkpoint format ", meta.at("format").dump(), " version ",
              meta.at("version").dump());
    state.iteration = meta.at("iteration").get<int64_t>();
    MOE_CHECK(state.iteration == *iteration, "checkpoint directory ", dir, " holds iteration ",
              state.iteration);
    state.consumed_train_samples = meta.at("consumed_train_samples").get<int64_t>();
    state.consumed_valid_samples = meta.at("consumed_valid_samples").get<int64_t>();
    state.args = meta.at("args");
    state.extra = meta.at("extra");
  } catch (const json::exception& e) {
    throw Error(detail::concat("checkpoint file ", meta_path, " lacks a field: ", e.what()));
  }

  Catalog catalog = [&] {
    try {
      return Catalog(dir, meta);
    } catch (const json::exception& e) {
      throw Error(detail::concat("checkpoint ", dir, " has a malformed index: ", e.what()));
    }
  }();
  local.stored = catalog.model_tensor_names();
  local.loaded.assign(local.stored.size(), 0);
  for (int i = 0; i < model.count(); ++i) {
    const ParamSpec& spec = model.spec(ParamHandle{i});
    Tensor param = model.param(ParamHandle{i});
    std::string source = spec.name;  // the checkpoint tensor it comes from ("": none)
    if (options.upcycling) {
      source = load_upcycled(catalog, spec, *options.upcycling, param, dir);
    } else {
      load_tensor(catalog, spec.name, spec, 0, shape_numel(spec.shape), param, dir);
    }
    if (source.empty()) continue;
    auto at = std::lower_bound(local.stored.begin(), local.stored.end(), source);
    local.loaded[size_t(at - local.stored.begin())] = 1;
  }
  if (optimizer != nullptr) optimizer->reload_main_params();
  if (options.load_optim) {
    if (optimizer != nullptr) load_optimizer_state(catalog, meta, model, *optimizer, dir);
    if (scheduler != nullptr) {
      MOE_CHECK(!meta.at("scheduler").is_null(), "checkpoint ", dir,
                " holds no learning-rate scheduler state; use --no-load-optim");
      scheduler->load_state(scheduler_from_json(meta.at("scheduler")));
    }
  }
  if (options.load_rng) {
    state.rng_saved_world_size = meta.at("layout").at("world_size").get<int>();
    // A rank the saving run did not have takes rank 0's states (see TrainingState).
    const int source = p.world_rank < state.rng_saved_world_size ? p.world_rank : 0;
    for (const auto& [name, value] : catalog.rng(source).items()) {
      state.rng[name] = value.get<Rng::State>();
    }
  }
  return local;
}

// Strict loading: every model tensor of the checkpoint went into some rank's model, so a
// checkpoint of a larger or different model is refused instead of partly loaded.
void check_every_tensor_loaded(const LocalLoad& local, const comm::ProcessGroup& world) {
  Tensor loaded({int64_t(local.loaded.size())}, DType::I64);
  std::copy(local.loaded.begin(), local.loaded.end(), loaded.data<int64_t>());
  if (world.size() > 1 && loaded.numel() > 0) comm::all_reduce(loaded, world, comm::ReduceOp::kMax);
  std::string unclaimed;
  int count = 0;
  for (size_t i = 0; i < local.stored.size(); ++i) {
    if (loaded.data<int64_t>()[i] != 0) continue;
    if (++count <= 5) unclaimed += (count > 1 ? ", '" : "'") + local.stored[i] + "'";
  }
  MOE_CHECK(count == 0, "checkpoint ", local.dir, " holds ", count,
            " tensor(s) that no rank's model has: ", unclaimed, count > 5 ? ", ..." : "",
            " (saved from a different model?)");
}

}  // namespace

TrainingState load_checkpoint(const std::string& load_dir, ParameterStore& model,
                              optim::Optimizer* optimizer,
                              optim::OptimizerParamScheduler* scheduler,
                              const comm::ParallelState& parallel, const LoadOptions& options) {
  LocalLoad local;
  std::string error = attempt(
      [&] { local = load_on_this_rank(load_dir, model, optimizer, scheduler, parallel, options); });
  agree(parallel.world, error, "loading checkpoint from '" + load_dir + "'");
  if (options.strict) check_every_tensor_loaded(local, parallel.world);
  return local.state;
}

}  // namespace moe::checkpoint
