#!/usr/bin/python3
"""The workloads of smear_bench in PyTorch, written the way the official SMEAR code runs them.

A block of N bottleneck adapters (d -> m -> d, SiLU, no up-projection bias, residual added):
the router takes the mean of each example's tokens, a LayerNorm and a linear map to N logits,
softmax; SMEAR merges the experts with an einsum over the expert axis and applies the merged
adapter with bmm. top1 gathers the argmax expert's weights and scales its output by max p (the
"switch" form); ensemble runs every expert and mixes the outputs by p; single is one plain
adapter. `fwd` runs inference (no autograd); `fwdbwd` runs forward then backward with a fixed
random dy.

Needs Debian's python3-torch (run with /usr/bin/python3). Prints one JSON object per workload
(name, median wall-clock milliseconds "ms", median process CPU milliseconds "cpu_ms", every
repetition), names as in smear_bench:
    /usr/bin/python3 bench/compare_pytorch.py smear/fwdbwd/d:768/m:64/N:8/L:128/B:32/threads:2
"""

import argparse
import json
import re
import statistics
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - depends on the machine
    sys.exit("compare_pytorch.py: PyTorch is not installed (Debian: apt-get install python3-torch; "
             "run with /usr/bin/python3)")

NAME = re.compile(r"^(smear|top1|ensemble|single)/(fwd|fwdbwd)/d:(\d+)/m:(\d+)/N:(\d+)/L:(\d+)/B:(\d+)/threads:(\d+)$")


class Block(torch.nn.Module):
    """N adapter experts and a router, parameters laid out as in the official code."""

    def __init__(self, kind, d, m, n):
        super().__init__()
        self.kind = kind
        g = torch.Generator().manual_seed(42)
        experts = 1 if kind == "single" else n
        self.down = torch.nn.Parameter(torch.randn(experts, d, m, generator=g) * 0.01)
        self.down_bias = torch.nn.Parameter(torch.zeros(experts, m))
        self.up = torch.nn.Parameter(torch.randn(experts, m, d, generator=g) * 0.01)
        if kind != "single":
            self.norm = torch.nn.LayerNorm(d)
            self.router = torch.nn.Linear(d, n)
            with torch.no_grad():
                self.router.weight.copy_(torch.randn(n, d, generator=g) * 0.01)
            torch.nn.init.zeros_(self.router.bias)

    def forward(self, x):
        if self.kind == "single":
            h = F.silu(torch.matmul(x, self.down[0]) + self.down_bias[0])
            return x + torch.matmul(h, self.up[0])
        p = torch.softmax(self.router(self.norm(x.mean(dim=1))), dim=-1)  # [B, N]
        if self.kind == "smear":
            down = torch.einsum("be,edm->bdm", p, self.down)
            bias = torch.einsum("be,em->bm", p, self.down_bias)
            up = torch.einsum("be,emd->bmd", p, self.up)
            h = F.silu(torch.bmm(x, down) + bias.unsqueeze(1))
            return x + torch.bmm(h, up)
        if self.kind == "top1":
            weight, index = p.max(dim=-1)
            down, bias, up = self.down[index], self.down_bias[index], self.up[index]
            h = F.silu(torch.bmm(x, down) + bias.unsqueeze(1))
            return x + weight[:, None, None] * torch.bmm(h, up)
        # ensemble: every expert on every example, outputs mixed by p
        h = F.silu(torch.einsum("bld,edm->belm", x, self.down) + self.down_bias[None, :, None, :])
        y = torch.einsum("belm,emd->beld", h, self.up)
        return x + torch.einsum("be,beld->bld", p, y)


def measure(name, repetitions, min_time):
    match = NAME.match(name)
    if not match:
        raise SystemExit(f"compare_pytorch.py: cannot read workload name '{name}'")
    kind, mode, d, m, n, length, batch, threads = match.groups()
    d, m, n, length, batch, threads = map(int, (d, m, n, length, batch, threads))
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    block = Block(kind, d, m, n)
    x = torch.randn(batch, length, d)
    dy = torch.randn(batch, length, d)

    if mode == "fwd":
        block.eval()

        def step():
            with torch.no_grad():
                block(x)
    else:
        block.train()

        def step():
            y = block(x)
            y.backward(dy)  # gradients accumulate, as in smear

    step()  # warm-up
    # iterations per repetition: enough for min_time seconds
    t0 = time.perf_counter()
    step()
    once = max(time.perf_counter() - t0, 1e-6)
    iterations = max(1, int(min_time / once))
    times, cpu_times = [], []
    for _ in range(repetitions):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(iterations):
            step()
        times.append((time.perf_counter() - t0) / iterations * 1e3)
        cpu_times.append((time.process_time() - c0) / iterations * 1e3)
    return {"name": name, "ms": statistics.median(times), "cpu_ms": statistics.median(cpu_times),
            "repetitions": times, "iterations": iterations, "torch": torch.__version__, "threads": threads}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="+", help="names as in smear_bench, e.g. smear/fwdbwd/d:768/m:64/N:8/L:128/B:32/threads:2")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per repetition (at least one iteration)")
    args = parser.parse_args()
    torch.set_num_interop_threads(1)
    for name in args.workloads:
        print(json.dumps(measure(name, args.repetitions, args.min_time)), flush=True)


if __name__ == "__main__":
    main()
