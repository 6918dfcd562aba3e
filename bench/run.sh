#!/usr/bin/env bash
# Runs the benchmarks and their PyTorch peers and writes the reports under docs/benchmarks/.
#
#   bench/run.sh                 every step, with the build in ./build
#   BUILD_DIR=build-x bench/run.sh gemm
#   BENCH_THREADS=2              threads for ours and for PyTorch (default: all cores)
#
# Each step is a function step_<name>; to add a benchmark, write step_<name> below and add
# <name> to ALL_STEPS. Raw results go to bench/out/ (not tracked); reports to docs/benchmarks/.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BUILD_DIR:-$root/build}"
[[ "$build" = /* ]] || build="$root/$build"
out="$root/bench/out"
docs="$root/docs/benchmarks"
threads="${BENCH_THREADS:-$(nproc)}"
peer_python=/usr/bin/python3  # Debian's python3-torch, not whatever python3 is on PATH
mkdir -p "$out" "$docs"
export OMP_NUM_THREADS="$threads"

# One line describing the machine and its load now, for the reports.
machine() {
  echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
    "load average $(cut -d' ' -f1-3 /proc/loadavg) at start"
}

require() {
  [[ -x "$1" ]] || { echo "bench/run.sh: $1 is missing; build it first (cmake --build $build)" >&2; exit 1; }
}

# Dense SGEMM and grouped GEMM (ours, per-expert OpenBLAS, PyTorch per-expert matmuls).
step_gemm() {
  require "$build/bench/bench_gemm"
  local started
  started="$(machine)"
  echo "== gemm: bench_gemm ($threads threads)"
  "$build/bench/bench_gemm" --benchmark_format=console --benchmark_out_format=json \
    --benchmark_out="$out/gemm.json"
  echo "== gemm: PyTorch peer"
  "$peer_python" "$root/bench/torch_grouped_gemm.py" --out "$out/gemm_torch.json" \
    --threads "$threads"
  "$peer_python" "$root/bench/plot_gemm.py" --ours "$out/gemm.json" --peer "$out/gemm_torch.json" \
    --markdown "$docs/gemm.md" --png "$docs/grouped_gemm.png" --summary "$root/docs/BENCHMARKS.md" \
    --command "BENCH_THREADS=$threads bench/run.sh gemm" --machine "$started"
  echo "== gemm: wrote docs/benchmarks/gemm.md, docs/benchmarks/grouped_gemm.png and the table in" \
    "docs/BENCHMARKS.md"
}

# MoE layer forward+backward (ours and the PyTorch peer), its time outside GEMMs, peak memory.
step_moe_layer() {
  require "$build/bench/bench_moe_layer"
  local started
  started="$(machine)"
  echo "== moe_layer: bench_moe_layer ($threads threads)"
  "$build/bench/bench_moe_layer" --benchmark_filter='fwd_bwd|peak_memory' \
    --benchmark_format=console --benchmark_out_format=json --benchmark_out="$out/moe_layer.json"
  echo "== moe_layer: PyTorch peer"
  "$peer_python" "$root/bench/torch_moe_layer.py" --threads "$threads" --iterations 5 |
    tee "$out/moe_layer_torch.txt"
  "$peer_python" - "$out/moe_layer.json" "$out/moe_layer_torch.txt" "$docs/moe_layer.md" \
    "BENCH_THREADS=$threads bench/run.sh moe_layer" "$started" "$threads" <<'REPORT'
import json, re, sys

ours_path, peer_path, report_path, command, started, threads = sys.argv[1:]
results = json.load(open(ours_path))
layer = next(b for b in results["benchmarks"] if b["name"].startswith("moe_layer/fwd_bwd"))
peaks = [b for b in results["benchmarks"] if b["name"].startswith("moe_layer/peak_memory")]
peer_line = open(peer_path).read().strip()
match = re.search(r"([\d.]+) ms wall, ([\d.]+) ms CPU", peer_line)
if not match:
    sys.exit(f"bench/run.sh moe_layer: cannot read the PyTorch peer's line: {peer_line!r}")
peer_wall, peer_cpu = float(match.group(1)), float(match.group(2))
gflop = layer["GFLOP/s"] * layer["layer_ms"] * 1e-3
phases = ["router", "dispatch", "expert_buffers", "swiglu", "combine", "combine_backward",
          "swiglu_backward", "dispatch_backward"]  # in the layer's order
phase_text = ", ".join(f"{name} {layer[f'phase_{name}_ms']:.1f}" for name in phases)
rows = [  # means over the steps on both sides, as the peer reports them
    ("T=4096, H=1024, F=2048, 8 experts, top-2, fp32: wall time", layer["real_time"], peer_wall,
     layer["non_gemm_fraction"]),
    ("the same, process CPU time (all threads)", layer["layer_cpu_mean_ms"], peer_cpu,
     layer["non_gemm_cpu_fraction"]),
]
with open("/proc/loadavg") as f:
    load_now = " ".join(f.read().split()[:3])
lines = [
    "# MoE layer: forward+backward against PyTorch, time outside GEMMs, peak memory",
    "",
    f"Produced by `{command}` on {results['context'].get('date', 'an unknown date')} ({started};",
    f"load average {load_now} at the end). It runs, with {threads} threads each:",
    "",
    "```sh",
    f"OMP_NUM_THREADS={threads} build/bench/bench_moe_layer --benchmark_filter='fwd_bwd|peak_memory'",
    f"/usr/bin/python3 bench/torch_moe_layer.py --threads {threads} --iterations 5",
    "```",
    "",
    "Case: T = 4096 tokens, hidden 1024, ffn 2048 with SwiGLU (fc1 1024 -> 4096, fc2 2048 -> 1024),",
    "8 experts, top-2, fp32, no biases, softmax router with the aux loss (coefficient 0.01),",
    "dropless, grouped GEMM. Both sides run the same algorithm: gating product, top-k and softmax",
    "over the chosen logits, Switch aux loss, permutation grouped by expert, the expert MLPs,",
    "probability-weighted combine, then the full backward (input, router and expert weights).",
    f"About {gflop:.0f} GFLOP per forward+backward. Times are means of 5 steps after a warm-up",
    "on both sides; the non-GEMM share is from medians (below).",
    "",
    "| case | ours (ms) | PyTorch (ms) | PyTorch / ours | ours GFLOP/s | non-GEMM share |",
    "|---|---:|---:|---:|---:|---:|",
]
for name, ours, peer, share in rows:
    lines.append(f"| {name} | {ours:.1f} | {peer:.1f} | {peer / ours:.2f}x | "
                 f"{gflop / ours * 1e3:.1f} | {100 * share:.1f} % |")
lines += [
    "",
    "GFLOP/s on the CPU-time row is per CPU-second. The non-GEMM share is the time of the layer's",
    "work outside GEMMs over the layer's time. bench_moe_layer measures that work directly: it",
    "runs each phase through the public functions the layer calls, on the same shapes, and sums",
    "the phases' medians (`non_gemm_ms`), so the figure does not depend on subtracting two long,",
    "noisy times. This run:",
    "",
    f"- outside GEMMs: {layer['non_gemm_ms']:.1f} ms wall ({layer['non_gemm_cpu_ms']:.1f} ms CPU);"
    f" by phase (ms): {phase_text};",
    f"- the fastest samples of each phase add up to {layer['non_gemm_fastest_ms']:.1f} ms (nearer"
    " the cost on a quiet machine);",
    f"- cross-check, the layer less its GEMMs run alone right after it: "
    f"{layer['non_gemm_ms_by_difference']:.1f} ms wall, "
    f"{layer['non_gemm_cpu_ms_by_difference']:.1f} ms CPU; GEMMs alone {layer['gemm_ms']:.1f} ms,"
    f" layer / GEMMs {layer['layer_over_gemm']:.3f};",
    f"- minor page faults per forward+backward: {layer['layer_page_faults']:.0f}.",
    "",
    "Peak extra memory (`moe_layer/peak_memory`, hidden 1024, ffn 512, top-2): the resident",
    "high-water mark of one forward+backward above what was resident before it, with the tensor",
    "storage cache off, in MiB and in units of T * topk * hidden * 4 bytes; then what the cache",
    "keeps for the next step:",
    "",
]
for peak in peaks:
    t = re.search(r"T:(\d+)", peak["name"]).group(1)
    e = re.search(r"E:(\d+)", peak["name"]).group(1)
    lines.append(f"- T={t}, {e} experts: {peak['peak_extra_MiB']:.1f} MiB = "
                 f"{peak['per_T_topk_H_fp32']:.2f} units; cache keeps {peak['cache_kept_MiB']:.0f}"
                 " MiB")
lines += [
    "",
    "The peak grows with T * topk and not with the number of experts (no T x num_experts x",
    "hidden buffer exists). Per dispatched row it holds the saved expert input (H), fc1 output",
    "(2 * ffn = H here), activation (ffn), expert output kept for the probability gradient (H),",
    "half a row of layer output, and the backward's transient gradients of those rows.",
    "",
    "The machine is shared with other jobs: see the load above. When another program keeps a",
    "core busy, every OpenMP barrier waits for a time slice and all times grow, the short phases",
    "most; compare with the fastest-sample sum, and rerun on a quiet machine before quoting.",
    "",
]
open(report_path, "w").write("\n".join(lines))
REPORT
  echo "== moe_layer: wrote docs/benchmarks/moe_layer.md"
}

ALL_STEPS=(gemm moe_layer)

steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=("${ALL_STEPS[@]}")
for step in "${steps[@]}"; do
  if ! declare -F "step_$step" > /dev/null; then
    echo "bench/run.sh: unknown step '$step' (steps: ${ALL_STEPS[*]})" >&2
    exit 2
  fi
  "step_$step"
done
