"""The peer of bench_moe_layer: the same MoE layer forward+backward in PyTorch on the CPU, written
the way Megatron-Core's reference path does it (top-k router with softmax over the chosen
logits and the Switch aux loss, sort-based permutation, one GEMM pair per expert, probability
scaling and index_add unpermute).

usage: /usr/bin/python3 bench/torch_moe_layer.py [--threads N] [--iterations N]
Prints the mean forward+backward wall time and process CPU time in milliseconds.
"""
import argparse
import time

import torch
import torch.nn.functional as F

TOKENS, HIDDEN, FFN, EXPERTS, TOPK, AUX_COEFF = 4096, 1024, 2048, 8, 2, 1e-2


def moe_layer(x, router_weight, fc1, fc2):
    logits = x @ router_weight  # [T, E]
    top_logits, top_experts = torch.topk(logits, k=TOPK, dim=1)
    probs = torch.softmax(top_logits, dim=-1)  # [T, k]
    # Switch load-balancing loss over the full softmax scores.
    scores = torch.softmax(logits, dim=-1)
    routed = torch.zeros_like(scores).scatter(1, top_experts, 1.0)
    aux = (scores.sum(0) * routed.sum(0)).sum() * EXPERTS * AUX_COEFF / (TOPK * TOKENS * TOKENS)
    # Permute: slots sorted by expert, stable so tokens stay in order inside an expert.
    flat_experts = top_experts.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    token_of_row = order // TOPK
    rows = x.index_select(0, token_of_row)
    counts = torch.bincount(flat_experts, minlength=EXPERTS).tolist()
    outputs = []
    for expert, chunk in enumerate(rows.split(counts)):
        gate, up = (chunk @ fc1[expert]).chunk(2, dim=-1)
        outputs.append((F.silu(gate) * up) @ fc2[expert])
    expert_out = torch.cat(outputs) * probs.reshape(-1)[order].unsqueeze(-1)
    out = torch.zeros_like(x).index_add(0, token_of_row, expert_out)
    return out, aux


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    router_weight = (torch.randn(HIDDEN, EXPERTS) * 0.02).requires_grad_()
    fc1 = (torch.randn(EXPERTS, HIDDEN, 2 * FFN) * 0.02).requires_grad_()
    fc2 = (torch.randn(EXPERTS, FFN, HIDDEN) * 0.02).requires_grad_()
    grad_out = torch.randn(TOKENS, HIDDEN) * 1e-3

    def step():
        out, aux = moe_layer(x, router_weight, fc1, fc2)
        torch.autograd.backward([out, aux], [grad_out, torch.ones_like(aux)])

    step()  # warm-up
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(args.iterations):
        step()
    elapsed = (time.perf_counter() - start) / args.iterations
    cpu = (time.process_time() - start_cpu) / args.iterations
    print(f"torch_moe_layer T={TOKENS} H={HIDDEN} F={FFN} E={EXPERTS} top{TOPK} fp32 "
          f"threads={args.threads}: {elapsed * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms CPU "
          f"(all threads) per forward+backward")


if __name__ == "__main__":
    main()
