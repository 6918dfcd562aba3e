"""Independent reference for the MoE layer test: Megatron-Core's dropless MoE layer written with
PyTorch autograd in float64 (softmax top-k router with aux and z losses, SwiGLU experts with
biases, the routing probability applied inside the expert as Megatron's experts do, index_add
unpermute).

usage: layer_reference.py INPUT.json OUTPUT.json
The input holds the tokens, every parameter (router weight [H, E], fc1 [E, H, 2F], fc2 [E, F, H]
and their biases), the settings and a probe [T, H]. The output holds the layer output, the aux
and z losses, and the gradients of <output, probe> + aux + z with respect to the tokens and every
parameter.
"""
import json
import sys

import torch
import torch.nn.functional as F


def tensor(case, name, *shape):
    return torch.tensor(case[name], dtype=torch.float64).reshape(*shape).requires_grad_()


def main():
    with open(sys.argv[1]) as handle:
        case = json.load(handle)
    tokens, hidden, experts, ffn, topk = (case[k] for k in ("T", "H", "E", "F", "topk"))
    x = tensor(case, "hidden", tokens, hidden)
    params = {
        "router.weight": tensor(case, "router.weight", hidden, experts),
        "router.bias": tensor(case, "router.bias", experts),
        "experts.linear_fc1.weight": tensor(case, "experts.linear_fc1.weight", experts, hidden,
                                            2 * ffn),
        "experts.linear_fc1.bias": tensor(case, "experts.linear_fc1.bias", experts, 2 * ffn),
        "experts.linear_fc2.weight": tensor(case, "experts.linear_fc2.weight", experts, ffn,
                                            hidden),
        "experts.linear_fc2.bias": tensor(case, "experts.linear_fc2.bias", experts, hidden),
    }
    probe = torch.tensor(case["probe"], dtype=torch.float64).reshape(tokens, hidden)

    logits = x @ params["router.weight"] + params["router.bias"]
    top_logits, top_experts = torch.topk(logits, k=topk, dim=1)
    probs = torch.softmax(top_logits, dim=-1)
    scores = torch.softmax(logits, dim=-1)
    _, aux_experts = torch.topk(scores, k=topk, dim=1)
    routed = torch.zeros_like(scores).scatter(1, aux_experts, 1.0)
    aux = (scores.sum(0) * routed.sum(0)).sum() * experts * case["aux_coeff"] / (
        topk * tokens * tokens)
    z = case["z_coeff"] * torch.logsumexp(logits, dim=-1).square().mean()

    out = torch.zeros_like(x)
    fc1, b1 = params["experts.linear_fc1.weight"], params["experts.linear_fc1.bias"]
    fc2, b2 = params["experts.linear_fc2.weight"], params["experts.linear_fc2.bias"]
    for e in range(experts):
        token_index, slot = torch.nonzero(top_experts == e, as_tuple=True)
        p = probs[token_index, slot].unsqueeze(-1)
        gate, up = (x[token_index] @ fc1[e] + b1[e]).chunk(2, dim=-1)
        y = ((F.silu(gate) * up) * p) @ fc2[e] + b2[e] * p  # Megatron: probs inside the expert
        out = out.index_add(0, token_index, y)

    objective = (out * probe).sum() + aux + z
    objective.backward()
    result = {
        "output": out.detach().reshape(-1).tolist(),
        "load_balancing_loss": float(aux),
        "z_loss": float(z),
        "grad.hidden": x.grad.reshape(-1).tolist(),
    }
    for name, value in params.items():
        result["grad." + name] = value.grad.reshape(-1).tolist()
    with open(sys.argv[2], "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
