// Megatron-Core's rank layout. Ranks are points of a grid whose first axis varies fastest: dense
// layers use the axes (tp, cp, dp, pp), expert layers (etp, ep, edp, pp). A group of kind "tp-ep"
// holds the ranks that differ only along the tp and ep axes, listed with the first axis fastest,
// which is what Megatron's RankGenerator.get_ranks produces for the order "tp-cp-ep-dp-pp".
#include "moe/comm/parallel_state.h"

#include <algorithm>
#include <sstream>

#include "comm/exchange.h"

namespace moe::comm {

namespace {

using Groups = RankLayout::Groups;

// Coordinates of `index` in a mixed-radix grid with `sizes` (first axis fastest).
std::vector<int> coordinates(int index, const std::vector<int>& sizes) {
  std::vector<int> coords(sizes.size());
  for (size_t axis = 0; axis < sizes.size(); ++axis) {
    coords[axis] = index % sizes[axis];
    index /= sizes[axis];
  }
  return coords;
}

// The groups of ranks that vary only along the `selected` axes of the grid `sizes`: one group per
// point of the other axes (in grid order), each listing its ranks in grid order.
Groups groups_along(const std::vector<int>& sizes, const std::vector<bool>& selected) {
  std::vector<int> stride(sizes.size(), 1);
  for (size_t axis = 1; axis < sizes.size(); ++axis)
    stride[axis] = stride[axis - 1] * sizes[axis - 1];
  std::vector<int> inner_sizes, inner_strides, outer_sizes, outer_strides;
  for (size_t axis = 0; axis < sizes.size(); ++axis) {
    (selected[axis] ? inner_sizes : outer_sizes).push_back(sizes[axis]);
    (selected[axis] ? inner_strides : outer_strides).push_back(stride[axis]);
  }
  auto product = [](const std::vector<int>& values) {
    int result = 1;
    for (int v : values) result *= v;
    return result;
  };
  auto offset = [](const std::vector<int>& coords, const std::vector<int>& strides) {
    int result = 0;
    for (size_t i = 0; i < coords.size(); ++i) result += coords[i] * strides[i];
    return result;
  };
  Groups groups(size_t(product(outer_sizes)));
  for (size_t g = 0; g < groups.size(); ++g) {
    const int base = offset(coordinates(int(g), outer_sizes), outer_strides);
    for (int member = 0; member < product(inner_sizes); ++member) {
      groups[g].push_back(base + offset(coordinates(member, inner_sizes), inner_strides));
    }
  }
  return groups;
}

// Dense grid axes tp, cp, dp, pp; expert grid axes etp, ep, edp, pp.
enum DenseAxis { kTp, kCp, kDp, kDensePp };
enum ExpertAxis { kEtp, kEp, kEdp, kExpertPp };

// The groups along `axes` (DenseAxis or ExpertAxis values) of the 4-axis grid `sizes`.
Groups groups_along_axes(const std::vector<int>& sizes, std::initializer_list<int> axes) {
  std::vector<bool> selected(sizes.size(), false);
  for (int axis : axes) selected[size_t(axis)] = true;
  return groups_along(sizes, selected);
}

// The kinds of group, in the order they are built and printed.
struct GroupKind {
  const char* name;
  Groups RankLayout::*groups;
  ProcessGroup ParallelState::*group;
};
constexpr GroupKind kGroupKinds[] = {
    {"tp", &RankLayout::tp, &ParallelState::tp_group},
    {"cp", &RankLayout::cp_group, &ParallelState::cp_group},
    {"dp", &RankLayout::dp_group, &ParallelState::dp_group},
    {"dp_cp", &RankLayout::dp_cp, &ParallelState::dp_cp_group},
    {"tp_dp_cp", &RankLayout::tp_dp_cp, &ParallelState::tp_dp_cp_group},
    {"tp_cp", &RankLayout::tp_cp, &ParallelState::tp_cp_group},
    {"pp", &RankLayout::pp, &ParallelState::pp_group},
    {"model_parallel", &RankLayout::model_parallel, &ParallelState::model_parallel_group},
    {"embedding", &RankLayout::embedding, &ParallelState::embedding_group},
    {"ep", &RankLayout::ep_group, &ParallelState::ep_group},
    {"etp", &RankLayout::etp_group, &ParallelState::etp_group},
    {"tp_ep", &RankLayout::tp_ep, &ParallelState::tp_ep_group},
    {"expert_dp", &RankLayout::expert_dp, &ParallelState::expert_dp_group},
};

ProcessGroup named_self_group(const char* name) {
  return detail::GroupAccess::make(std::make_shared<detail::GroupState>(), 0, 1, name,
                                   {detail::world_rank_or_zero()});
}

}  // namespace

int64_t ContextParallel::global_position(int64_t local, int64_t local_seq) const {
  const int64_t chunk = local_seq / 2;
  const int64_t cp = size();
  // First half: chunk r; second half: chunk 2 * cp - 1 - r.
  return local < chunk ? rank() * chunk + local : (2 * cp - 1 - rank()) * chunk + (local - chunk);
}

std::vector<int64_t> ContextParallel::global_positions(int64_t local_seq) const {
  std::vector<int64_t> positions(static_cast<size_t>(local_seq));
  for (int64_t i = 0; i < local_seq; ++i) positions[size_t(i)] = global_position(i, local_seq);
  return positions;
}

RankLayout compute_rank_layout(int world_size, const ParallelSizes& sizes) {
  const std::pair<const char*, int> named[] = {
      {"tp", sizes.tp}, {"pp", sizes.pp}, {"ep", sizes.ep}, {"etp", sizes.etp}, {"cp", sizes.cp}};
  for (const auto& [name, value] : named) {
    MOE_CHECK(value >= 1, "parallel size ", name, " must be >= 1, got ", value);
  }
  MOE_CHECK(world_size >= 1, "world_size must be >= 1, got ", world_size);
  const int model_size = sizes.tp * sizes.pp * sizes.cp;
  MOE_CHECK(world_size % model_size == 0, "world_size (", world_size, ") is not divisible by tp (",
            sizes.tp, ") x pp (", sizes.pp, ") x cp (", sizes.cp, ") = ", model_size);
  const int expert_model_size = sizes.etp * sizes.ep * sizes.pp;
  MOE_CHECK(world_size % expert_model_size == 0, "world_size (", world_size,
            ") is not divisible by etp (", sizes.etp, ") x ep (", sizes.ep, ") x pp (", sizes.pp,
            ") = ", expert_model_size, " (the expert tensor x expert model x pipeline size)");
  RankLayout layout;
  layout.sizes = sizes;
  layout.world_size = world_size;
  layout.dp = world_size / model_size;
  layout.edp = world_size / expert_model_size;

  const std::vector<int> dense = {sizes.tp, sizes.cp, layout.dp, sizes.pp};
  const std::vector<int> expert = {sizes.etp, sizes.ep, layout.edp, sizes.pp};
  layout.tp = groups_along_axes(dense, {kTp});
  layout.cp_group = groups_along_axes(dense, {kCp});
  layout.dp_group = groups_along_axes(dense, {kDp});
  layout.dp_cp = groups_along_axes(dense, {kCp, kDp});
  layout.tp_dp_cp = groups_along_axes(dense, {kTp, kCp, kDp});
  layout.tp_cp = groups_along_axes(dense, {kTp, kCp});
  layout.pp = groups_along_axes(dense, {kDensePp});
  layout.model_parallel = groups_along_axes(dense, {kTp, kDensePp});
  for (const std::vector<int>& stages : layout.pp) {  // first and last pipeline stage
    layout.embedding.push_back(
        stages.size() == 1 ? stages : std::vector<int>{stages.front(), stages.back()});
  }
  layout.ep_group = groups_along_axes(expert, {kEp});
  layout.etp_group = groups_along_axes(expert, {kEtp});
  layout.tp_ep = groups_along_axes(expert, {kEtp, kEp});
  layout.expert_dp = groups_along_axes(expert, {kEdp});
  return layout;
}

std::string describe_rank_layout(int world_size, const ParallelSizes& sizes) {
  const RankLayout layout = compute_rank_layout(world_size, sizes);
  std::ostringstream out;
  out << "world_size " << world_size << ": dense tp " << sizes.tp << " x cp " << sizes.cp
      << " x dp " << layout.dp << " x pp " << sizes.pp << "; expert etp " << sizes.etp << " x ep "
      << sizes.ep << " x edp " << layout.edp << " x pp " << sizes.pp << "\n";
  for (const GroupKind& kind : kGroupKinds) {
    out << kind.name << ":";
    for (const std::vector<int>& group : layout.*kind.groups) {
      out << " [";
      for (size_t i = 0; i < group.size(); ++i) out << (i ? ", " : "") << group[i];
      out << "]";
    }
    out << "\n";
  }
  return out.str();
}

ParallelState initialize_model_parallel(const ParallelSizes& sizes) {
  ParallelState state;
  state.world = ProcessGroup::world();
  const RankLayout layout = compute_rank_layout(state.world.size(), sizes);
  state.sizes = sizes;
  state.world_size = layout.world_size;
  state.world_rank = state.world.rank();
  state.dp = layout.dp;
  state.edp = layout.edp;
  for (const GroupKind& kind : kGroupKinds) {
    const Groups& groups = layout.*kind.groups;
    auto mine = std::find_if(groups.begin(), groups.end(), [&](const std::vector<int>& group) {
      return std::find(group.begin(), group.end(), state.world_rank) != group.end();
    });
    // Only the embedding kind leaves ranks out (middle pipeline stages): they get a group of one.
    std::vector<int> members = mine != groups.end() ? *mine : std::vector<int>{state.world_rank};
    if (mine == groups.end()) state.in_embedding_group = false;
    state.*kind.group = ProcessGroup::from_ranks(state.world, std::move(members), kind.name);
  }
  return state;
}

ParallelState single_process_state() {
  ParallelState state;
  state.world = named_self_group("world");
  for (const GroupKind& kind : kGroupKinds) state.*kind.group = named_self_group(kind.name);
  return state;
}

}  // namespace moe::comm
