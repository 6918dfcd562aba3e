"""Qwen2-MoE and Qwen3-MoE in the Hugging Face layout, written and run with numpy only, independently
of moecore, for hf_qwen_tests.

  qwen_moe_reference.py write MODEL_DIR FAMILY SEED
      writes config.json and model.safetensors (hand-built: struct + json) of a small random model,
      FAMILY qwen2_moe or qwen3_moe, in float64, named and shaped as Qwen2MoeForCausalLM /
      Qwen3MoeForCausalLM name and shape them.
  qwen_moe_reference.py forward MODEL_DIR TOKENS_JSON
      reads any such directory back and prints the logits [batch][seq][vocab_size] of the tokens
      ([batch][seq] ints) as JSON, computed in float64 following transformers' modeling_qwen2_moe.py
      and modeling_qwen3_moe.py."""
import json
import os
import sys

import numpy as np

from reference_common import load_float64, rms_norm, rotate_half, silu, write_model

# Small, awkward shapes: grouped queries, a head size that is not hidden / heads (Qwen3), dense
# layers placed by mlp_only_layers (Qwen3) or decoder_sparse_step (Qwen2), tied embeddings (Qwen2).
CONFIGS = {
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": 37, "hidden_size": 24, "intermediate_size": 14, "moe_intermediate_size": 10,
        "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 2,
        "head_dim": 6, "num_experts": 5, "num_experts_per_tok": 2, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [1], "max_position_embeddings": 64,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
        "hidden_act": "silu", "router_aux_loss_coef": 0.001, "torch_dtype": "float64",
    },
    "qwen2_moe": {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "vocab_size": 41, "hidden_size": 24, "intermediate_size": 18, "moe_intermediate_size": 8,
        "shared_expert_intermediate_size": 12, "num_hidden_layers": 4,
        "num_attention_heads": 6, "num_key_value_heads": 3, "num_experts": 4,
        "num_experts_per_tok": 3, "norm_topk_prob": False, "decoder_sparse_step": 2,
        "mlp_only_layers": [], "max_position_embeddings": 64,
        "rope_parameters": {"rope_theta": 50000.0, "rope_type": "default"}, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 4096,
        "max_window_layers": 2, "hidden_act": "silu", "torch_dtype": "float64",
    },
}


def head_dim(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def is_moe_layer(cfg, layer):
    return layer not in cfg["mlp_only_layers"] and (layer + 1) % cfg["decoder_sparse_step"] == 0


def tensor_shapes(cfg):
    """The model's tensors as HF names them (Qwen2MoeForCausalLM / Qwen3MoeForCausalLM)."""
    qwen2 = cfg["model_type"] == "qwen2_moe"
    H, V, d = cfg["hidden_size"], cfg["vocab_size"], head_dim(cfg)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": [V, H], "model.norm.weight": [H]}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = [V, H]

    def mlp(prefix, width):
        shapes[prefix + "gate_proj.weight"] = [width, H]
        shapes[prefix + "up_proj.weight"] = [width, H]
        shapes[prefix + "down_proj.weight"] = [H, width]

    for layer in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % layer
        shapes[p + "input_layernorm.weight"] = [H]
        shapes[p + "post_attention_layernorm.weight"] = [H]
        for name, rows in (("q", heads * d), ("k", kv * d), ("v", kv * d)):
            shapes[p + "self_attn.%s_proj.weight" % name] = [rows, H]
            if qwen2 and cfg.get("qkv_bias", True):
                shapes[p + "self_attn.%s_proj.bias" % name] = [rows]
        shapes[p + "self_attn.o_proj.weight"] = [H, heads * d]
        if not qwen2:
            shapes[p + "self_attn.q_norm.weight"] = [d]
            shapes[p + "self_attn.k_norm.weight"] = [d]
        if not is_moe_layer(cfg, layer):
            mlp(p + "mlp.", cfg["intermediate_size"])
            continue
        shapes[p + "mlp.gate.weight"] = [cfg["num_experts"], H]
        for e in range(cfg["num_experts"]):
            mlp(p + "mlp.experts.%d." % e, cfg["moe_intermediate_size"])
        if qwen2:
            mlp(p + "mlp.shared_expert.", cfg["shared_expert_intermediate_size"])
            shapes[p + "mlp.shared_expert_gate.weight"] = [1, H]
    return shapes


def write(model_dir, family, seed):
    cfg = CONFIGS[family]
    rng = np.random.default_rng(seed)
    tensors = {}
    # Stored in a shuffled order: readers must go by the header, not by position.
    shapes = tensor_shapes(cfg)
    for name in rng.permutation(sorted(shapes)):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            # moecore applies norm gains in float32 (tensor/ops.cc rmsnorm) even to float64
            # activations: float32-exact gains keep the float64 comparison exact.
            values = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32).astype(np.float64)
        else:
            values = 0.3 * rng.standard_normal(shape)
        tensors[str(name)] = values
    write_model(model_dir, tensors, cfg, metadata={"format": "pt"})


def attention(x, w, p, cfg, theta):
    batch, seq, _ = x.shape
    heads, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], head_dim(cfg)

    def project(name, count):
        y = x @ w[p + name + "_proj.weight"].T
        if p + name + "_proj.bias" in w:
            y = y + w[p + name + "_proj.bias"]
        return y.reshape(batch, seq, count, d).transpose(0, 2, 1, 3)  # [b, heads, s, d]

    q, k, v = project("q", heads), project("k", kv), project("v", kv)
    if p + "q_norm.weight" in w:  # Qwen3: RMSNorm over each head before the rotation
        q = rms_norm(q, w[p + "q_norm.weight"], cfg["rms_norm_eps"])
        k = rms_norm(k, w[p + "k_norm.weight"], cfg["rms_norm_eps"])
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.outer(np.arange(seq, dtype=np.float64), inv_freq)
    angles = np.concatenate((angles, angles), axis=-1)
    q = q * np.cos(angles) + rotate_half(q) * np.sin(angles)
    k = k * np.cos(angles) + rotate_half(k) * np.sin(angles)
    k = np.repeat(k, heads // kv, axis=1)  # repeat_kv: query head h reads kv head h // (heads/kv)
    v = np.repeat(v, heads // kv, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
    scores = np.where(np.triu(np.ones((seq, seq), dtype=bool), 1), -np.inf, scores)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
    context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, seq, heads * d)
    return context @ w[p + "o_proj.weight"].T


def mlp(x, w, p):
    hidden = silu(x @ w[p + "gate_proj.weight"].T) * (x @ w[p + "up_proj.weight"].T)
    return hidden @ w[p + "down_proj.weight"].T


def sparse_moe(x, w, p, cfg):
    logits = x @ w[p + "gate.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)  # softmax over all experts
    out = np.zeros_like(x)
    for row in range(x.shape[0]):
        chosen = np.argsort(-probs[row], kind="stable")[:cfg["num_experts_per_tok"]]
        weights = probs[row, chosen]
        if cfg["norm_topk_prob"]:
            weights = weights / weights.sum()
        for expert, weight in zip(chosen, weights):
            out[row] += weight * mlp(x[row], w, p + "experts.%d." % expert)
    if p + "shared_expert_gate.weight" in w:  # Qwen2: the sigmoid-gated shared expert
        gate = 1.0 / (1.0 + np.exp(-(x @ w[p + "shared_expert_gate.weight"].T)))
        out += gate * mlp(x, w, p + "shared_expert.")
    return out


def forward(model_dir, tokens):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg.setdefault("mlp_only_layers", [])
    cfg.setdefault("decoder_sparse_step", 1)
    theta = cfg["rope_theta"] if "rope_theta" in cfg else cfg["rope_parameters"]["rope_theta"]
    w = load_float64(model_dir)
    eps = cfg["rms_norm_eps"]
    x = w["model.embed_tokens.weight"][np.array(tokens)]
    batch, seq, hidden = x.shape
    for layer in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % layer
        x = x + attention(rms_norm(x, w[p + "input_layernorm.weight"], eps), w, p + "self_attn.",
                          cfg, theta)
        y = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps).reshape(-1, hidden)
        if is_moe_layer(cfg, layer):
            y = sparse_moe(y, w, p + "mlp.", cfg)
        else:
            y = mlp(y, w, p + "mlp.")
        x = x + y.reshape(batch, seq, hidden)
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    print(json.dumps((x @ head.T).tolist()))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        forward(sys.argv[2], json.loads(sys.argv[3]))
