#!/usr/bin/python3
"""One training step of a SMEAR block from Python: smear.Block (the C++ cpu layer) against the
same block in plain PyTorch (bench/compare_pytorch.py's, the official code's form), in one run,
alternating. A step: forward, backward of <y, dy> for a fixed random dy, AdamW step.

    PYTHONPATH=build/python /usr/bin/python3 bench/bench_python.py [--threads 2] [--repetitions 7]

Prints one JSON object per implementation: median, min and max milliseconds per step.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_pytorch import Block as TorchBlock  # noqa: E402

import smear  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--m", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per repetition")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    x = torch.randn(a.batch, a.length, a.d)
    dy = torch.randn(a.batch, a.length, a.d)

    plain = TorchBlock("smear", a.d, a.m, a.experts)
    ours = smear.Block("adapter", d=a.d, m=a.m, experts=a.experts, pool="mean", threads=a.threads)
    with torch.no_grad():  # the same parameters: smear's row of experts is down, down.bias, up
        ours.expert_tensor("down.weight").copy_(plain.down)
        ours.expert_tensor("down.bias").copy_(plain.down_bias)
        ours.expert_tensor("up.weight").copy_(plain.up)
        ours.router.layer_norm.weight.copy_(plain.norm.weight)
        ours.router.layer_norm.bias.copy_(plain.norm.bias)
        ours.router.weight.copy_(plain.router.weight)
        ours.router.bias.copy_(plain.router.bias)
    diff = (ours(x) - plain(x)).abs().max().item()

    runs = {}
    for name, block in (("smear.Block", ours), ("pytorch", plain)):
        opt = torch.optim.AdamW(block.parameters(), lr=1e-4)

        def step(block=block, opt=opt):
            opt.zero_grad()
            y = block(x)
            y.backward(dy)
            opt.step()

        step()  # warm-up
        runs[name] = (step, [])
    for _ in range(a.repetitions):
        for name, (step, times) in runs.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step()
            times.append((time.perf_counter() - t0) / a.steps * 1e3)
    for name, (_, times) in runs.items():
        print(json.dumps({"name": name, "d": a.d, "m": a.m, "N": a.experts, "L": a.length, "B": a.batch,
                          "threads": a.threads, "ms_median": round(statistics.median(times), 2),
                          "ms_min": round(min(times), 2), "ms_max": round(max(times), 2),
                          "max_abs_diff_of_y_at_start": diff, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
