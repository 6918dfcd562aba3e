"""Independent reference for the router tests: Megatron-Core's routing formulas written with
PyTorch (Debian's python3-torch), in float64.

usage: router_reference.py INPUT.json OUTPUT.json
The input is a list of cases, each with the router's input, weight [H, E], bias [E], expert
bias [E] and routing settings (group-limited routing, several balancing types); the output is a
list with, per case, the dense routing probabilities [T, E], the load-balancing loss (the sum
over the listed types) and the z-loss (coefficients included), as the C++ test compares them.
"""
import json
import sys

import torch


def select(scores, case):
    """Megatron's top-k, or group_limited_topk when groups are set: (values, indices)."""
    topk, groups, group_topk = case["topk"], case["num_groups"], case["group_topk"]
    if group_topk is None:
        return torch.topk(scores, k=topk, dim=1)
    tokens, experts = scores.shape
    group_scores = scores.view(tokens, groups, -1).topk(topk // group_topk, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(tokens, groups, experts // groups)
    masked = scores.masked_fill(~score_mask.reshape(tokens, -1).bool(), float("-inf"))
    return torch.topk(masked, k=topk, dim=-1)


def route_slots(logits, case):
    """Megatron's topk_routing_with_score_function: (probs [T, topk], expert ids [T, topk])."""
    topk = case["topk"]
    if case["score_function"] == "softmax":
        if case["pre_softmax"]:
            probs, indices = select(torch.softmax(logits, dim=-1), case)
        else:
            values, indices = select(logits, case)
            probs = torch.softmax(values, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        if case["expert_bias"] is not None:
            bias = torch.tensor(case["expert_bias"], dtype=torch.float64)
            _, indices = select(scores + bias, case)
            probs = torch.gather(scores, 1, indices)
        else:
            probs, indices = select(scores, case)
        if topk > 1:
            probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
    if case["scaling_factor"] is not None:
        probs = probs * case["scaling_factor"]
    return probs, indices


def route(logits, case):
    probs, indices = route_slots(logits, case)
    return torch.zeros_like(logits).scatter(1, indices, probs)


def load_balancing_loss(logits, case, seq_length, batch):
    """The sum over the listed types (a tensor, differentiable in the logits); global_aux_loss on
    one micro-batch uses its own counts."""
    num_experts, topk = logits.shape[1], case["topk"]
    if case["score_function"] == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    _, indices = torch.topk(scores, k=topk, dim=1)
    routing_map = torch.zeros_like(logits).scatter(1, indices, 1.0)
    total = 0.0
    for kind, coeff in zip(case["load_balancing_type"], case["aux_coeff"]):
        if kind in ("aux_loss", "global_aux_loss"):
            tokens = logits.shape[0]
            per_expert = routing_map.sum(dim=0)
            total = total + (scores.sum(dim=0) * per_expert).sum() * num_experts * coeff / (
                topk * tokens * tokens)
        elif kind == "seq_aux_loss":
            # tokens are sequence-major (t = s * B + b): [S, B * E] puts each sequence in a column
            seq_scores = scores.reshape(seq_length, -1)
            per_expert = routing_map.reshape(seq_length, -1).sum(dim=0)
            loss = (seq_scores.sum(dim=0) * per_expert).sum() * num_experts * coeff / (
                topk * seq_length * seq_length)
            total = total + loss / batch
    return total


def evaluate(case):
    seq_length, batch, hidden = case["shape"]
    x = torch.tensor(case["hidden"], dtype=torch.float64).reshape(seq_length * batch, hidden)
    weight = torch.tensor(case["weight"], dtype=torch.float64).reshape(hidden, -1)
    logits = x @ weight
    if case["bias"]:
        logits = logits + torch.tensor(case["bias"], dtype=torch.float64)
    result = {
        "probs": route(logits, case).reshape(-1).tolist(),
        "load_balancing_loss": float(load_balancing_loss(logits, case, seq_length, batch)),
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
