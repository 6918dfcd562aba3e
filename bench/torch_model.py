#!/usr/bin/python3
"""The model of bench/bench_model.cc written in PyTorch (CPU): forward+backward tokens/s.

4 layers, hidden 512, 8 heads in 4 query groups (head dim 64), RMSNorm, rope, SwiGLU, no biases,
untied output layer, every layer MoE with 8 experts (ffn 1024), top-2 with softmax after top-k,
Megatron-style dispatch (stable sort of (token, expert) pairs by expert, one GEMM per expert,
probability-weighted index_add back), vocabulary 8192, one sequence of 512 tokens, fp32.
Prints "tokens_per_s <value>". Run with Debian's /usr/bin/python3 (python3-torch).
"""
import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

LAYERS, HIDDEN, HEADS, GROUPS, FFN = 4, 512, 8, 4, 1024
EXPERTS, TOPK, VOCAB, SEQ, BATCH = 8, 2, 8192, 512, 1
HEAD_DIM = HIDDEN // HEADS
STD = 0.02


def normal(*shape, std=STD):
    return torch.nn.Parameter(torch.randn(*shape) * std)


def rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x):  # x [b, n, s, d]; pairs (i, i + d/2) as Megatron's non-interleaved rope
    half = HEAD_DIM // 2
    inv_freq = 10000.0 ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    angles = torch.arange(x.shape[2], dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().float(), angles.sin().float()
    first, second = x[..., :half], x[..., half:]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        per_group = HEADS // GROUPS
        output_std = STD / math.sqrt(2 * LAYERS)
        self.input_norm = torch.nn.Parameter(torch.ones(HIDDEN))
        self.qkv = normal(HIDDEN, GROUPS * (per_group + 2) * HEAD_DIM)
        self.proj = normal(HEADS * HEAD_DIM, HIDDEN, std=output_std)
        self.pre_mlp_norm = torch.nn.Parameter(torch.ones(HIDDEN))
        self.router = normal(HIDDEN, EXPERTS)
        # One tensor per expert (Megatron's SequentialMLP): slicing a stacked [E, ...] parameter
        # would make autograd materialise a full-size gradient per expert.
        self.fc1 = torch.nn.ParameterList(normal(HIDDEN, 2 * FFN) for _ in range(EXPERTS))
        self.fc2 = torch.nn.ParameterList(
            normal(FFN, HIDDEN, std=output_std) for _ in range(EXPERTS))

    def attention(self, x):  # x [s * b, h], rows (s, b)
        per_group = HEADS // GROUPS
        mixed = (x @ self.qkv).view(SEQ, BATCH, GROUPS, per_group + 2, HEAD_DIM)
        q = mixed[:, :, :, :per_group].reshape(SEQ, BATCH, HEADS, HEAD_DIM).permute(1, 2, 0, 3)
        k = mixed[:, :, :, per_group].permute(1, 2, 0, 3)
        v = mixed[:, :, :, per_group + 1].permute(1, 2, 0, 3)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(per_group, dim=1)
        v = v.repeat_interleave(per_group, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
        probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        context = (probs @ v).permute(2, 0, 1, 3).reshape(SEQ * BATCH, HEADS * HEAD_DIM)
        return context @ self.proj

    def moe(self, x):  # x [T, h]
        logits = x @ self.router
        top_logits, experts = torch.topk(logits, TOPK, dim=-1)
        probs = torch.softmax(top_logits, dim=-1)
        flat = experts.flatten()
        order = torch.sort(flat, stable=True).indices
        token_ids = order // TOPK
        counts = torch.bincount(flat, minlength=EXPERTS).tolist()
        rows = x[token_ids]
        outputs, start = [], 0
        for e, count in enumerate(counts):
            gate, up = (rows[start:start + count] @ self.fc1[e]).chunk(2, dim=-1)
            outputs.append((F.silu(gate) * up) @ self.fc2[e])
            start += count
        weighted = torch.cat(outputs) * probs.flatten()[order][:, None]
        return torch.zeros_like(x).index_add(0, token_ids, weighted)

    def forward(self, x):
        x = x + self.attention(rms_norm(x, self.input_norm))
        return x + self.moe(rms_norm(x, self.pre_mlp_norm))


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = normal(VOCAB, HIDDEN)
        self.layers = torch.nn.ModuleList(Layer() for _ in range(LAYERS))
        self.final_norm = torch.nn.Parameter(torch.ones(HIDDEN))
        self.output = normal(HIDDEN, VOCAB)

    def forward(self, tokens, labels):  # [b, s] -> mean loss; rows ordered (s, b)
        x = self.embedding[tokens.t().reshape(-1)]
        for layer in self.layers:
            x = layer(x)
        logits = rms_norm(x, self.final_norm) @ self.output
        return F.cross_entropy(logits.float(), labels.t().reshape(-1))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    model = Model()
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    model(tokens, labels).backward()  # warm-up
    elapsed = 0.0
    for _ in range(args.steps):
        model.zero_grad(set_to_none=False)
        start = time.perf_counter()
        model(tokens, labels).backward()
        elapsed += time.perf_counter() - start
    print(f"tokens_per_s {BATCH * SEQ * args.steps / elapsed:.1f}")
    print(f"ms_per_step {1000 * elapsed / args.steps:.1f}")


if __name__ == "__main__":
    main()
