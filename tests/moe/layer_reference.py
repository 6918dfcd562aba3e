"""Independent reference for the MoE layer tests: Megatron-Core's MoE layer written with PyTorch
autograd in float64, for every router and dispatch variant the layer offers: softmax (top-k then
softmax, or pre-softmax) and sigmoid scores, the top-k scaling factor, the expert bias,
group-limited routing and Sinkhorn (from router_reference.py and below); Megatron's
apply_router_token_dropping (capacity factor, "probs" and "position" drop policies; padding to
capacity adds zero-weight rows only, so it leaves the numbers unchanged); the aux, seq-aux,
global-aux and z losses; GeLU or SwiGLU experts with or without biases, the routing probability
applied inside the expert as Megatron's experts do; index_add unpermute.

usage: layer_reference.py INPUT.json OUTPUT.json
The input is a list of cases, each with the tokens [S, B, H] (sequence-major, token t = s * B +
b), every parameter by its name under the layer ("router.weight" [H, E], "router.bias" [E],
"experts.linear_fc1.weight" [E, H, N1], "experts.linear_fc1.bias" [E, N1],
"experts.linear_fc2.weight" [E, F, H], "experts.linear_fc2.bias" [E, H]; N1 = 2F for SwiGLU as
[gate | up]), the jitter noise the router input was multiplied by (or null), the settings and a
probe [S, B, H]. The output is a list with, per case, the layer output, the losses, and the
gradients of <output, probe> + balancing losses + z-loss with respect to the tokens and every
parameter.
"""
import json
import math
import sys

import torch
import torch.nn.functional as F

from router_reference import load_balancing_loss, route_slots


def sinkhorn(cost, tol=1e-4):
    """S-BASE balancing: exp(cost) scaled by row and column factors until the mean change of the
    column factors is at most tol."""
    weights = torch.exp(cost)
    rows, cols = weights.shape
    row_scale = torch.ones(rows, dtype=cost.dtype)
    col_scale = torch.ones(cols, dtype=cost.dtype)
    change = math.inf
    while change > tol:
        row_scale = 1.0 / (rows * ((weights * col_scale).sum(dim=1) + 1e-8))
        new_col_scale = 1.0 / (cols * ((weights * row_scale[:, None]).sum(dim=0) + 1e-8))
        change = float((new_col_scale - col_scale).abs().mean())
        col_scale = new_col_scale
    return weights * col_scale * row_scale[:, None]


def routed_slots(logits, case):
    """(probs [T, topk], expert ids [T, topk]) as Megatron's router picks them in training."""
    if "sinkhorn" not in case["load_balancing_type"]:
        return route_slots(logits, case)
    with torch.no_grad():
        _, indices = torch.topk(sinkhorn(logits), k=case["topk"], dim=1)
    scores = torch.sigmoid(logits) if case["topk"] == 1 else torch.softmax(logits, dim=-1)
    return torch.gather(scores, 1, indices), indices


def kept_slots(probs, indices, case):
    """[T, topk] booleans: the slots the experts keep under the capacity factor. An expert over
    capacity keeps its highest-probability tokens (lower token first among equals) or its
    earliest ones."""
    keep = torch.ones_like(indices, dtype=torch.bool)
    factor = case["capacity_factor"]
    if factor is None:
        return keep
    tokens, topk = indices.shape
    capacity = math.ceil(tokens * topk / case["E"] * factor)
    for expert in range(case["E"]):
        token_index, slot = torch.nonzero(indices == expert, as_tuple=True)
        pairs = list(zip(token_index.tolist(), slot.tolist()))
        if case["drop_policy"] == "probs":
            pairs.sort(key=lambda pair: (-float(probs[pair]), pair[0]))
        for pair in pairs[capacity:]:
            keep[pair] = False
    return keep


def evaluate(case):
    seq_length, batch, hidden = case["shape"]
    tokens, experts, ffn = seq_length * batch, case["E"], case["F"]
    x = torch.tensor(case["hidden"], dtype=torch.float64).reshape(tokens, hidden).requires_grad_()
    params = {name: torch.tensor(values, dtype=torch.float64).requires_grad_()
              for name, values in case["params"].items()}
    width = 2 * ffn if case["activation"] == "swiglu" else ffn
    fc1 = params["experts.linear_fc1.weight"].reshape(experts, hidden, width)
    fc2 = params["experts.linear_fc2.weight"].reshape(experts, ffn, hidden)
    b1 = params.get("experts.linear_fc1.bias")
    b2 = params.get("experts.linear_fc2.bias")
    probe = torch.tensor(case["probe"], dtype=torch.float64).reshape(tokens, hidden)

    router_input = x
    if case["jitter_noise"] is not None:
        router_input = x * torch.tensor(case["jitter_noise"], dtype=torch.float64).reshape(
            tokens, hidden)
    logits = router_input @ params["router.weight"].reshape(hidden, experts)
    if "router.bias" in params:
        logits = logits + params["router.bias"]
    probs, indices = routed_slots(logits, case)
    keep = kept_slots(probs.detach(), indices, case)
    balancing = load_balancing_loss(logits, case, seq_length, batch)
    z_loss = 0.0
    if case["z_coeff"] is not None:
        z_loss = case["z_coeff"] * torch.logsumexp(logits, dim=-1).square().mean()

    out = torch.zeros_like(x)
    for e in range(experts):
        token_index, slot = torch.nonzero((indices == e) & keep, as_tuple=True)
        p = probs[token_index, slot].unsqueeze(-1)
        pre = x[token_index] @ fc1[e]
        if b1 is not None:
            pre = pre + b1.reshape(experts, width)[e]
        if case["activation"] == "swiglu":
            gate, up = pre.chunk(2, dim=-1)
            act = F.silu(gate) * up
        else:
            act = F.gelu(pre)
        y = (act * p) @ fc2[e]  # Megatron: probs inside the expert
        if b2 is not None:
            y = y + b2.reshape(experts, hidden)[e] * p
        out = out.index_add(0, token_index, y)

    objective = (out * probe).sum() + balancing + z_loss
    objective.backward()
    result = {
        "output": out.detach().reshape(-1).tolist(),
        "load_balancing_loss": float(balancing),
        "z_loss": float(z_loss),
        "kept_slots": int(keep.sum()),
        "grad.hidden": x.grad.reshape(-1).tolist(),
    }
    for name, value in params.items():
        result["grad." + name] = value.grad.reshape(-1).tolist()
    return result


def main():
    with open(sys.argv[1]) as handle:
        cases = json.load(handle)
    with open(sys.argv[2], "w") as handle:
        json.dump([evaluate(case) for case in cases], handle)


if __name__ == "__main__":
    main()
