#!/usr/bin/python3
"""PyTorch peer for bench_gemm: the same grouped products as per-expert torch matmuls.

This is what a PyTorch CPU MoE layer does without a grouped kernel: one matmul per expert on
its slice of the row-stacked tokens. Cases and shapes mirror bench/bench_gemm.cc exactly:
grouped/<shape>/<form>/<dtype> and rows_per_expert/<dtype>/<rows>. forward and grad_input write
the input dtype; grad_weight accumulates into fp32 (as main grads do). Cases the installed
torch cannot run (fp16 matmul on CPU in torch 1.13) are recorded as null. Each case records the
mean wall seconds and the mean process CPU seconds (all threads) per call.

Usage: /usr/bin/python3 bench/torch_grouped_gemm.py --out FILE.json [--threads N] [--min-time S]
"""
import argparse
import json
import time

import torch

HIDDEN = 1024  # K
FFN = 2048  # N
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def group_shapes():
    skewed = [2048] + [2048 // 7 + (1 if g < 2048 % 7 else 0) for g in range(7)]
    many_small = [24 + (g * 13) % 17 for g in range(64)]
    many_small[63] += 2048 - sum(many_small)
    return {"even": [512] * 8, "skewed": skewed, "many_small": many_small}


def make_operands(rows, dtype):
    generator = torch.Generator().manual_seed(1)
    total, groups = sum(rows), len(rows)

    def uniform(*shape):
        return (torch.rand(*shape, generator=generator) * 2 - 1).to(dtype)

    return {
        "x": uniform(total, HIDDEN),
        "w": uniform(groups, HIDDEN, FFN),
        "dy": uniform(total, FFN),
        "y": torch.empty(total, FFN, dtype=dtype),
        "dx": torch.empty(total, HIDDEN, dtype=dtype),
        "dw": torch.zeros(groups, HIDDEN, FFN, dtype=torch.float32),
    }


def grouped_product(form, rows, o):
    """Returns a function running the per-expert matmuls of one form."""
    bounds = []
    start = 0
    for count in rows:
        bounds.append((start, start + count))
        start += count

    def forward():
        for g, (a, b) in enumerate(bounds):
            torch.matmul(o["x"][a:b], o["w"][g], out=o["y"][a:b])

    def grad_input():
        for g, (a, b) in enumerate(bounds):
            torch.matmul(o["dy"][a:b], o["w"][g].t(), out=o["dx"][a:b])

    def grad_weight():
        for g, (a, b) in enumerate(bounds):
            o["dw"][g] += torch.matmul(o["x"][a:b].t(), o["dy"][a:b]).float()

    return {"forward": forward, "grad_input": grad_input, "grad_weight": grad_weight}[form]


def mean_seconds(body, min_time):
    """Mean wall and process CPU seconds (all threads) per call, after a warm-up call."""
    body()
    calls, start, start_cpu = 0, time.perf_counter(), time.process_time()
    while calls < 3 or time.perf_counter() - start < min_time:
        body()
        calls += 1
    return {
        "wall": (time.perf_counter() - start) / calls,
        "cpu": (time.process_time() - start_cpu) / calls,
    }


def timed(body, min_time):
    try:
        return mean_seconds(body, min_time)
    except RuntimeError as error:  # e.g. "addmm_impl_cpu_" not implemented for 'Half'
        print(f"  unavailable: {str(error).splitlines()[0]}")
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--min-time", type=float, default=0.3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"torch": torch.__version__, "threads": args.threads, "seconds": {}}
    seconds = results["seconds"]
    for shape, rows in group_shapes().items():
        for dtype_name, dtype in DTYPES.items():
            operands = make_operands(rows, dtype)
            for form in ("forward", "grad_input", "grad_weight"):
                name = f"grouped/{shape}/{form}/{dtype_name}"
                seconds[name] = timed(grouped_product(form, rows, operands), args.min_time)
                print(name, seconds[name])
            del operands
    for dtype_name in ("fp32", "bf16"):
        for count in (8, 16, 32, 64, 128, 256, 512):
            rows = [count] * 8
            operands = make_operands(rows, DTYPES[dtype_name])
            name = f"rows_per_expert/{dtype_name}/{count}"
            seconds[name] = timed(grouped_product("forward", rows, operands), args.min_time / 2)
            print(name, seconds[name])
    with open(args.out, "w") as out:
        json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
