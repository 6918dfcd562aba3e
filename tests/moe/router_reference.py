"""Independent reference for the router tests: Megatron-Core's routing formulas written with
PyTorch (Debian's python3-torch), in float64.

usage: router_reference.py INPUT.json OUTPUT.json
The input is a list of cases, each with the router's input, weight [H, E], bias [E] and routing
settings; the output is a list with, per case, the dense routing probabilities [T, E], the
load-balancing loss and the z-loss (coefficients included), as the C++ test compares them.
"""
import json
import sys

import torch


def route(logits, case):
    topk = case["topk"]
    if case["score_function"] == "softmax":
        if case["pre_softmax"]:
            probs, indices = torch.topk(torch.softmax(logits, dim=-1), k=topk, dim=1)
        else:
            values, indices = torch.topk(logits, k=topk, dim=1)
            probs = torch.softmax(values, dim=-1)
    else:
        probs, indices = torch.topk(torch.sigmoid(logits), k=topk, dim=1)
        if topk > 1:
            probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
    if case["scaling_factor"] is not None:
        probs = probs * case["scaling_factor"]
    return torch.zeros_like(logits).scatter(1, indices, probs)


def load_balancing_loss(logits, case, seq_length, batch):
    num_experts, topk, coeff = logits.shape[1], case["topk"], case["aux_coeff"]
    if case["score_function"] == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    _, indices = torch.topk(scores, k=topk, dim=1)
    routing_map = torch.zeros_like(logits).scatter(1, indices, 1.0)
    if case["load_balancing_type"] == "aux_loss":
        tokens = logits.shape[0]
        per_expert = routing_map.sum(dim=0)
        return float((scores.sum(dim=0) * per_expert).sum() * num_experts * coeff /
                     (topk * tokens * tokens))
    if case["load_balancing_type"] == "seq_aux_loss":
        # tokens are sequence-major (t = s * B + b): [S, B * E] puts each sequence in a column
        scores = scores.reshape(seq_length, -1)
        per_expert = routing_map.reshape(seq_length, -1).sum(dim=0)
        loss = (scores.sum(dim=0) * per_expert).sum() * num_experts * coeff / (
            topk * seq_length * seq_length)
        return float(loss / batch)
    return 0.0


def evaluate(case):
    seq_length, batch, hidden = case["shape"]
    x = torch.tensor(case["hidden"], dtype=torch.float64).reshape(seq_length * batch, hidden)
    weight = torch.tensor(case["weight"], dtype=torch.float64).reshape(hidden, -1)
    logits = x @ weight
    if case["bias"]:
        logits = logits + torch.tensor(case["bias"], dtype=torch.float64)
    result = {
        "probs": route(logits, case).reshape(-1).tolist(),
        "load_balancing_loss": load_balancing_loss(logits, case, seq_length, batch),
        "z_loss": 0.0,
    }
    if case["z_coeff"] is not None:
        result["z_loss"] = float(case["z_coeff"] * torch.logsumexp(logits, dim=-1).square().mean())
    return result


def main():
    with open(sys.argv[1]) as handle:
        cases = json.load(handle)
    with open(sys.argv[2], "w") as handle:
        json.dump([evaluate(case) for case in cases], handle)


if __name__ == "__main__":
    main()
