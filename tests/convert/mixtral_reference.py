"""Mixtral's forward (Hugging Face's MixtralForCausalLM semantics) written out in torch, reading
an HF model directory with struct + json only. Prints the mean next-token cross-entropy of the
given tokens and labels, for hf_mixtral_tests to compare with moecore's forward on the converted
weights.

usage: mixtral_reference.py MODEL_DIR TOKENS_JSON LABELS_JSON   (each [batch][seq] ints)"""
import json
import os
import sys

import torch
from reference_common import safetensors_entries

DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
          "F16": torch.float16}


def load_tensors(model_dir):
    tensors = {}
    for name, dtype, shape, raw in safetensors_entries(model_dir):
        t = torch.frombuffer(bytearray(raw), dtype=DTYPES[dtype])
        tensors[name] = t.reshape(shape).to(torch.float64)
    return tensors


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention(x, w, prefix, cfg):
    batch, seq, _ = x.shape
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // heads
    q = (x @ w[prefix + "q_proj.weight"].T).view(batch, seq, heads, d).transpose(1, 2)
    k = (x @ w[prefix + "k_proj.weight"].T).view(batch, seq, kv_heads, d).transpose(1, 2)
    v = (x @ w[prefix + "v_proj.weight"].T).view(batch, seq, kv_heads, d).transpose(1, 2)
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k = k.repeat_interleave(heads // kv_heads, dim=1)  # HF's repeat_kv
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / d ** 0.5
    causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, heads * d)
    return context @ w[prefix + "o_proj.weight"].T


def sparse_moe(x, w, prefix, cfg):
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    probs = (x @ w[prefix + "gate.weight"].T).softmax(-1)
    top_probs, top_experts = probs.topk(cfg["num_experts_per_tok"], dim=-1)
    top_probs = top_probs / top_probs.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(cfg["num_local_experts"]):
        e_prefix = prefix + "experts.%d." % e
        weight = (top_probs * (top_experts == e)).sum(-1, keepdim=True)
        gate = torch.nn.functional.silu(x @ w[e_prefix + "w1.weight"].T)
        hidden = gate * (x @ w[e_prefix + "w3.weight"].T)
        out += weight * (hidden @ w[e_prefix + "w2.weight"].T)
    return out.reshape(shape)


def main(model_dir, tokens, labels):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    w = load_tensors(model_dir)
    eps = cfg["rms_norm_eps"]
    x = w["model.embed_tokens.weight"][torch.tensor(tokens)]
    for layer in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % layer
        x = x + attention(rms_norm(x, w[p + "input_layernorm.weight"], eps), w, p + "self_attn.",
                          cfg)
        x = x + sparse_moe(rms_norm(x, w[p + "post_attention_layernorm.weight"], eps), w,
                           p + "block_sparse_moe.", cfg)
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    logits = x @ head.T
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             torch.tensor(labels).reshape(-1))
    print(repr(loss.item()))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]))
