#!/usr/bin/env python3
"""The SMEAR block of bench_cuda.cu in PyTorch eager, timed the same way (CUDA events, mean
over iterations after warm-up), for comparing smear's cuda backend with PyTorch on one GPU.

    python3 bench/cuda/torch_smear.py [d m L B iterations]   (defaults: 768 64 128 32 50; N = 8)

The block: masked mean pool -> LayerNorm -> linear -> softmax -> merged adapter parameters
(P.Theta) -> per-example x.W_d + b_d -> SiLU -> .W_u -> + x, forward and backward.
"""
import sys

import torch


def main():
    d, m, L, B, iters = (768, 64, 128, 32, 50) if len(sys.argv) == 1 else map(int, sys.argv[1:6])
    N = 8
    dev = torch.device("cuda")
    torch.manual_seed(0)
    P = 2 * d * m + m
    bank = (0.01 * torch.randn(N, P, device=dev)).requires_grad_()
    ln = torch.nn.LayerNorm(d).to(dev)
    router = torch.nn.Linear(d, N).to(dev)
    x = torch.randn(B, L, d, device=dev, requires_grad=True)
    dy = 0.01 * torch.randn(B, L, d, device=dev)

    def block(x):
        p = torch.softmax(router(ln(x.mean(dim=1))), dim=-1)  # [B, N]
        theta = p @ bank                                       # [B, P]
        wd = theta[:, : d * m].view(B, d, m)
        bd = theta[:, d * m : d * m + m].view(B, 1, m)
        wu = theta[:, d * m + m :].view(B, m, d)
        return x + torch.bmm(torch.nn.functional.silu(torch.bmm(x, wd) + bd), wu)

    def fwd():
        with torch.no_grad():
            block(x)

    def fwd_bwd():
        block(x).backward(dy)

    def time(f):
        for _ in range(3):
            f()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            f()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / iters

    print(f"device: {torch.cuda.get_device_name()}; PyTorch {torch.__version__} eager, float32: "
          f"d = {d}, m = {m}, N = {N}, L = {L}, B = {B}, {iters} iterations")
    print(f"forward (no grad)   {time(fwd):.4f} ms")
    print(f"forward + backward  {time(fwd_bwd):.4f} ms")


if __name__ == "__main__":
    main()
