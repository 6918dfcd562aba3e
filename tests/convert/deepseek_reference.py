"""An independent DeepSeek-V3 writer and fp64 forward for hf_deepseek_tests, in numpy only (the
Debian /usr/bin/python3's python3-numpy), following Hugging Face's DeepseekV3ForCausalLM:
multi-latent attention with q_a/kv_a layernorms, the interleaved rope of the pe part
(rope_interleave), YaRN rope_scaling with its attention factor and mscale_all_dim softmax scale,
dense first_k_dense_replace layers, sigmoid routing with e_score_correction_bias, n_group /
topk_group group-limited choice (a group scores its top-2 sum), norm_topk_prob and
routed_scaling_factor, and a shared expert.

The "v2" variant follows DeepseekV2ForCausalLM instead (DeepSeek-V2-Lite's layout): no query
compression (q_proj), rope on complex pairs (2i, 2i + 1), softmax over all experts with
group_limited_greedy choice (a group scores its best expert), top-k weights not renormalised,
no e_score_correction_bias, two shared experts.

The V3 model has one multi-token-prediction module (model.layers.3).

usage: deepseek_reference.py write MODEL_DIR SEED [v2]  writes config.json + model.safetensors
       deepseek_reference.py logprobs MODEL_DIR TOKENS  prints log-softmax [b][s][vocab] as JSON
       deepseek_reference.py mtp_losses MODEL_DIR TOKENS LABELS  prints each MTP module's loss
"""
import json
import math
import os
import sys

import numpy as np
from reference_common import load_float64, rms_norm, rotate_half, silu, write_model

CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 37,
    "hidden_size": 16,
    "intermediate_size": 20,
    "moe_intermediate_size": 6,
    "num_hidden_layers": 3,
    "num_attention_heads": 3,
    "num_key_value_heads": 3,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5,
    "n_group": 4,
    "topk_group": 2,
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "q_lora_rank": 8,
    "kv_lora_rank": 7,
    "qk_nope_head_dim": 4,
    "qk_rope_head_dim": 6,
    "v_head_dim": 5,
    "max_position_embeddings": 16384,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "rope_interleave": True,
    "num_nextn_predict_layers": 1,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.8,
                     "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1},
}

V2_CHANGES = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "q_lora_rank": None,
    "topk_method": "group_limited_greedy",
    "num_experts_per_tok": 2,
    "n_shared_experts": 2,
    "routed_scaling_factor": 1.5,
    "norm_topk_prob": False,
    "rope_scaling": None,
    "num_nextn_predict_layers": 0,
}


def hf_shapes(c):
    h, n = c["hidden_size"], c["num_attention_heads"]
    q_dim = n * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"])
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h)}

    def mlp(prefix, width):
        shapes[prefix + "gate_proj.weight"] = (width, h)
        shapes[prefix + "up_proj.weight"] = (width, h)
        shapes[prefix + "down_proj.weight"] = (h, width)

    mtp_layers = c.get("num_nextn_predict_layers", 0)
    for layer in range(c["num_hidden_layers"] + mtp_layers):
        p = "model.layers.%d." % layer
        a = p + "self_attn."
        if layer >= c["num_hidden_layers"]:  # a multi-token-prediction module
            shapes[p + "embed_tokens.weight"] = (c["vocab_size"], h)
            shapes[p + "enorm.weight"] = (h,)
            shapes[p + "hnorm.weight"] = (h,)
            shapes[p + "eh_proj.weight"] = (h, 2 * h)
            shapes[p + "shared_head.norm.weight"] = (h,)
            shapes[p + "shared_head.head.weight"] = (c["vocab_size"], h)
        shapes[p + "input_layernorm.weight"] = (h,)
        if c["q_lora_rank"]:
            shapes[a + "q_a_proj.weight"] = (c["q_lora_rank"], h)
            shapes[a + "q_a_layernorm.weight"] = (c["q_lora_rank"],)
            shapes[a + "q_b_proj.weight"] = (q_dim, c["q_lora_rank"])
        else:
            shapes[a + "q_proj.weight"] = (q_dim, h)
        shapes[a + "kv_a_proj_with_mqa.weight"] = (c["kv_lora_rank"] + c["qk_rope_head_dim"], h)
        shapes[a + "kv_a_layernorm.weight"] = (c["kv_lora_rank"],)
        shapes[a + "kv_b_proj.weight"] = (n * (c["qk_nope_head_dim"] + c["v_head_dim"]),
                                          c["kv_lora_rank"])
        shapes[a + "o_proj.weight"] = (h, n * c["v_head_dim"])
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if layer < c["first_k_dense_replace"]:
            mlp(p + "mlp.", c["intermediate_size"])
            continue
        shapes[p + "mlp.gate.weight"] = (c["n_routed_experts"], h)
        if c["model_type"] == "deepseek_v3":
            shapes[p + "mlp.gate.e_score_correction_bias"] = (c["n_routed_experts"],)
        for e in range(c["n_routed_experts"]):
            mlp(p + "mlp.experts.%d." % e, c["moe_intermediate_size"])
        if c["n_shared_experts"]:
            mlp(p + "mlp.shared_experts.", c["moe_intermediate_size"] * c["n_shared_experts"])
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (c["vocab_size"], h)
    return shapes


def write(model_dir, seed, variant):
    config = dict(CONFIG, **(V2_CHANGES if variant == "v2" else {}))
    if variant == "v2":
        del config["rope_interleave"]
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in hf_shapes(config).items():
        if name.endswith("e_score_correction_bias"):
            # fp32 as DeepSeek ships it; positive so that HF's masking of unchosen groups with 0
            # never outranks a chosen expert (sigmoid + bias > 0).
            tensors[name] = rng.uniform(0.0, 0.2, shape).astype(np.float32)
        elif "norm" in name:
            # fp32 values stored as fp64: moecore's RMSNorm applies its gain in fp32 (ops.cc).
            tensors[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32).astype(np.float64)
        else:
            tensors[name] = rng.normal(0.0, 0.3, shape)
    for name in tensors:  # HF's MTP modules hold copies of the embedding and output head
        if name.endswith(".embed_tokens.weight"):
            tensors[name] = tensors["model.embed_tokens.weight"]
        elif name.endswith(".shared_head.head.weight"):
            tensors[name] = tensors["lm_head.weight"]
    write_model(model_dir, tensors, config)


def yarn_get_mscale(scale, mscale=1.0):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_tables(c, seq):
    """HF's cos / sin (cat(freqs, freqs), times the attention factor) for the pe part."""
    dim, base = c["qk_rope_head_dim"], c["rope_theta"]
    pos_freqs = base ** (np.arange(0, dim, 2) / dim)
    inv_freq, factor = 1.0 / pos_freqs, 1.0
    scaling = c.get("rope_scaling")
    if scaling:
        factor = scaling["factor"]
        original = scaling["original_max_position_embeddings"]

        def correction_dim(rotations):
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(scaling["beta_fast"])), 0)
        high = min(math.ceil(correction_dim(scaling["beta_slow"])), dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention = yarn_get_mscale(factor)
    else:
        attention = 1.0
    freqs = np.outer(np.arange(seq), inv_freq)
    emb = np.concatenate([freqs, freqs], -1)
    return np.cos(emb) * attention, np.sin(emb) * attention


def interleaved_rope(x, cos, sin):  # HF's apply_rotary_pos_emb_interleave on one tensor
    b, h, s, d = x.shape
    x = x.reshape(b, h, s, d // 2, 2).swapaxes(3, 4).reshape(b, h, s, d)
    return x * cos + rotate_half(x) * sin


def complex_pair_rope(x, cos, sin):  # HF's DeepSeek-V2 apply_rotary_emb on one tensor
    half = x.shape[-1] // 2
    pairs = x[..., 0::2] + 1j * x[..., 1::2]
    rotated = pairs * (cos[..., :half] + 1j * sin[..., :half])
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = rotated.real, rotated.imag
    return out


def attention(x, w, a, c):
    b, s, _ = x.shape
    n, nope, pe, dv = (c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
                       c["v_head_dim"])
    eps = 1e-6  # HF's q_a_layernorm / kv_a_layernorm keep their default eps
    if c["q_lora_rank"]:
        q = rms_norm(x @ w[a + "q_a_proj.weight"].T, w[a + "q_a_layernorm.weight"], eps)
        q = q @ w[a + "q_b_proj.weight"].T
    else:
        q = x @ w[a + "q_proj.weight"].T
    q = q.reshape(b, s, n, nope + pe).transpose(0, 2, 1, 3)
    q_pass, q_rot = q[..., :nope], q[..., nope:]
    compressed = x @ w[a + "kv_a_proj_with_mqa.weight"].T
    k_pass, k_rot = compressed[..., :c["kv_lora_rank"]], compressed[..., c["kv_lora_rank"]:]
    kv = rms_norm(k_pass, w[a + "kv_a_layernorm.weight"], eps) @ w[a + "kv_b_proj.weight"].T
    kv = kv.reshape(b, s, n, nope + dv).transpose(0, 2, 1, 3)
    k_pass, v = kv[..., :nope], kv[..., nope:]
    k_rot = k_rot.reshape(b, 1, s, pe)
    cos, sin = rope_tables(c, s)
    rope = interleaved_rope if c["model_type"] == "deepseek_v3" else complex_pair_rope
    q_rot, k_rot = rope(q_rot, cos, sin), rope(k_rot, cos, sin)
    query = np.concatenate([q_pass, q_rot], -1)
    key = np.concatenate([k_pass, np.broadcast_to(k_rot, k_pass.shape[:-1] + (pe,))], -1)
    scaling = (nope + pe) ** -0.5
    if c.get("rope_scaling") and c["rope_scaling"].get("mscale_all_dim"):
        m = yarn_get_mscale(c["rope_scaling"]["factor"], c["rope_scaling"]["mscale_all_dim"])
        scaling *= m * m
    scores = query @ key.swapaxes(-1, -2) * scaling
    scores = np.where(np.triu(np.ones((s, s), dtype=bool), 1), -np.inf, scores)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, n * dv)
    return context @ w[a + "o_proj.weight"].T


def mlp(x, w, prefix):
    gate = silu(x @ w[prefix + "gate_proj.weight"].T)
    return (gate * (x @ w[prefix + "up_proj.weight"].T)) @ w[prefix + "down_proj.weight"].T


def moe_v2(x, w, prefix, c):
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    E, G = c["n_routed_experts"], c["n_group"]
    logits = x @ w[prefix + "gate.weight"].T
    scores = np.exp(logits - logits.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
    group_scores = scores.reshape(-1, G, E // G).max(-1)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        groups = np.argsort(-group_scores[t], kind="stable")[:c["topk_group"]]
        allowed = np.zeros(E, dtype=bool)
        for g in groups:
            allowed[g * (E // G):(g + 1) * (E // G)] = True
        masked = np.where(allowed, scores[t], 0.0)
        top = np.argsort(-masked, kind="stable")[:c["num_experts_per_tok"]]
        for e in top:
            weight = scores[t, e] * c["routed_scaling_factor"]
            out[t] += weight * mlp(x[t:t + 1], w, prefix + "experts.%d." % e)[0]
    out += mlp(x, w, prefix + "shared_experts.")
    return out.reshape(shape)


def moe(x, w, prefix, c):
    if c["model_type"] == "deepseek_v2":
        return moe_v2(x, w, prefix, c)
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    E, G = c["n_routed_experts"], c["n_group"]
    scores = 1.0 / (1.0 + np.exp(-(x @ w[prefix + "gate.weight"].T)))
    choice = scores + w[prefix + "gate.e_score_correction_bias"][None, :]
    group_scores = np.sort(choice.reshape(-1, G, E // G), -1)[..., -2:].sum(-1)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        groups = np.argsort(-group_scores[t], kind="stable")[:c["topk_group"]]
        allowed = np.zeros(E, dtype=bool)
        for g in groups:
            allowed[g * (E // G):(g + 1) * (E // G)] = True
        masked = np.where(allowed, choice[t], 0.0)
        top = np.argsort(-masked, kind="stable")[:c["num_experts_per_tok"]]
        weights = scores[t, top]
        if c["norm_topk_prob"]:
            weights = weights / (weights.sum() + 1e-20)
        weights = weights * c["routed_scaling_factor"]
        for e, weight in zip(top, weights):
            out[t] += weight * mlp(x[t:t + 1], w, prefix + "experts.%d." % e)[0]
    if c["n_shared_experts"]:
        out += mlp(x, w, prefix + "shared_experts.")
    return out.reshape(shape)


def decoder_layer(x, w, p, c, moe_layer):
    eps = c["rms_norm_eps"]
    x = x + attention(rms_norm(x, w[p + "input_layernorm.weight"], eps), w, p + "self_attn.", c)
    h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
    return x + (moe(h, w, p + "mlp.", c) if moe_layer else mlp(h, w, p + "mlp."))


def log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def forward(model_dir, tokens):
    """(config, weights, the decoder's output after model.norm [b, s, h])."""
    with open(os.path.join(model_dir, "config.json")) as f:
        c = json.load(f)
    w = load_float64(model_dir)
    x = w["model.embed_tokens.weight"][np.array(tokens)]
    for layer in range(c["num_hidden_layers"]):
        x = decoder_layer(x, w, "model.layers.%d." % layer, c,
                          layer >= c["first_k_dense_replace"])
    return c, w, rms_norm(x, w["model.norm.weight"], c["rms_norm_eps"])


def logprobs(model_dir, tokens):
    c, w, h = forward(model_dir, tokens)
    print(json.dumps(log_softmax(h @ w["lm_head.weight"].T).tolist()))


def mtp_losses(model_dir, tokens, labels):
    """DeepSeek-V3's multi-token prediction: module k combines the embedding of the tokens k
    ahead with the previous module's output and predicts the labels k ahead (shifted-in
    positions: token 0, not counted); prints each module's mean cross-entropy."""
    c, w, h = forward(model_dir, tokens)
    tokens, labels = np.array(tokens), np.array(labels)
    eps, losses = c["rms_norm_eps"], []
    for k in range(1, c["num_nextn_predict_layers"] + 1):
        p = "model.layers.%d." % (c["num_hidden_layers"] + k - 1)
        ahead = np.zeros_like(tokens)
        ahead[:, :-k] = tokens[:, k:]
        embedded = rms_norm(w[p + "embed_tokens.weight"][ahead], w[p + "enorm.weight"], eps)
        x = np.concatenate([embedded, rms_norm(h, w[p + "hnorm.weight"], eps)], -1)
        x = decoder_layer(x @ w[p + "eh_proj.weight"].T, w, p, c, True)
        h = rms_norm(x, w[p + "shared_head.norm.weight"], eps)
        lp = log_softmax(h @ w[p + "shared_head.head.weight"].T)
        seq = tokens.shape[1]
        picked = np.take_along_axis(lp[:, :seq - k], labels[:, k:, None], -1)
        losses.append(-picked.mean())
    print(json.dumps(losses))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "v3")
    elif sys.argv[1] == "mtp_losses":
        mtp_losses(sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]))
    else:
        logprobs(sys.argv[2], json.loads(sys.argv[3]))
