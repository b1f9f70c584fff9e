#!/usr/bin/env python3
"""How often BF16 node partials (EPCOMM_INTER_BF16_PARTIALS=1) leave one BF16 rounding of the float32
reference: the tolerance the Python tests check combined_x with (tests/python/_reference.py close_bf16:
|got - want| <= 1e-3 + 2^-7 |want|). A model on the CPU, not a measurement of the kernels.

Each token sums K weighted BF16 expert rows whose experts lie on random nodes. float32 partials: the
origin adds float32 node sums and rounds once. BF16 partials: each node's sum is rounded to BF16
first. Where the node sums cancel, their roundings are large against |want|.

    python3 tools/bf16_partials_model.py [--tokens 2000] [--hidden 2048] [--topk 8] [--seed 0]
"""
import argparse

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    T, H, K = a.tokens, a.hidden, a.topk
    print("| nodes | partials | elements outside close_bf16 | worst excess |")
    print("| ---: | --- | ---: | ---: |")
    for nodes in (2, 4, 8):
        y = torch.randn(T, K, H).bfloat16().float()  # the experts' outputs, as the tests draw them
        w = torch.rand(T, K)
        node = torch.randint(0, nodes, (T, K))
        contrib = y * w[..., None]
        want = contrib.sum(1)
        parts = torch.stack([(contrib * (node == n).float()[..., None]).sum(1) for n in range(nodes)], 1)
        for name, got in (("float32", parts.sum(1).bfloat16().float()),
                          ("BF16", parts.bfloat16().float().sum(1).bfloat16().float())):
            excess = (got - want).abs() - (1e-3 + 2 ** -7 * want.abs())
            off = int((excess > 0).sum())
            print(f"| {nodes} | {name} | {off} of {want.numel()} ({100 * off / want.numel():.2f}%) | "
                  f"{max(float(excess.max()), 0.0):.4f} |")


if __name__ == "__main__":
    main()
