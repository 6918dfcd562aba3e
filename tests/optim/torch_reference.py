"""Independent reference for the optimizer tests: the same steps with PyTorch's own
torch.optim.AdamW / torch.optim.SGD and torch.nn.utils.clip_grad_norm_ (Debian's python3-torch,
float32, as Megatron's fp32 main parameters).

usage: torch_reference.py INPUT.json OUTPUT.json
Input: a list of cases, each with optimizer ("adam" | "sgd"), hyper-parameters, clip_grad, the per-step learning rates,
the parameters (name, shape, values, decay) and the gradients of every step. Output: per case,
the final parameter values by name and the gradient norm of every step.
"""
import json
import sys

import torch


def run(case):
    params = {}
    for p in case["params"]:
        params[p["name"]] = torch.tensor(p["values"], dtype=torch.float32).reshape(p["shape"])
        params[p["name"]].requires_grad_(True)
    decayed = [params[p["name"]] for p in case["params"] if p["decay"]]
    plain = [params[p["name"]] for p in case["params"] if not p["decay"]]
    groups = [{"params": decayed, "weight_decay": case["weight_decay"]},
              {"params": plain, "weight_decay": 0.0}]
    if case["optimizer"] == "adam":
        optimizer = torch.optim.AdamW(groups, lr=case["lrs"][0],
                                      betas=(case["adam_beta1"], case["adam_beta2"]),
                                      eps=case["adam_eps"])
    else:
        optimizer = torch.optim.SGD(groups, lr=case["lrs"][0], momentum=case["sgd_momentum"])
    norms = []
    for lr, grads in zip(case["lrs"], case["grads"]):
        for name, values in grads.items():
            params[name].grad = torch.tensor(values, dtype=torch.float32).reshape(
                params[name].shape)
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()),
                                                          case["clip_grad"])))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    return {"params": {name: p.detach().reshape(-1).tolist() for name, p in params.items()},
            "grad_norms": norms}


def main(input_path, output_path):
    with open(input_path) as f:
        cases = json.load(f)
    with open(output_path, "w") as f:
        json.dump([run(case) for case in cases], f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
