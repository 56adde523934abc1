#!/usr/bin/env python3
"""The α–β model of bench/SCALING.md, fitted to smear_bench_mpi's output and checked against it.

    for np in 1 2 4; do SMEAR_NUM_THREADS=1 mpirun -np $np --oversubscribe smear_bench_mpi; done > runs.md
    python3 bench/scaling_model.py runs.md

A ring all-reduce of n bytes over R processes takes T(n, R) = 2(R−1)·α + 2(R−1)/R · n·β. α and β are
fitted to the measured all-reduces at each R (see fit()); the model's
communication per step is then checked against the schemes' measured communication, and extended
to 8–64 processes on a stated interconnect with the compute measured here, for the benchmark's
workload and for experts of Lory's scale.
"""
import re
import sys
from collections import defaultdict

# The interconnect the extension assumes: one process per node, 100 Gb/s InfiniBand (HDR100)
# links, MPI latency 2 µs.
NET_ALPHA = 2e-6
NET_BETA = 1 / 12.5e9


def ring(n, R, alpha, beta):
    return 0.0 if R == 1 else 2 * (R - 1) * alpha + 2 * (R - 1) / R * n * beta


def parse(path):
    rows, sweep, shape = {}, defaultdict(list), {}
    for line in open(path):
        m = re.match(r"d (\d+), m (\d+), N (\d+), L (\d+), B (\d+)", line)
        if m:
            shape = dict(zip("dmNLB", map(int, m.groups())))
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not cells[1].isdigit():
            continue
        R = int(cells[1])
        if cells[0] == "allreduce":
            sweep[R].append((float(cells[5]) * 1e6, float(cells[2]) * 1e-3))
        else:
            rows[(cells[0], R)] = {"step": float(cells[2]) * 1e-3, "compute": float(cells[3]) * 1e-3,
                                   "comm": float(cells[4]) * 1e-3, "bytes": float(cells[5]) * 1e6}
    return shape, rows, sweep


def fit(points, R):
    """α from the messages of at most 4 KB (latency-bound), β from those of 1 MB and more
    (bandwidth-bound: where the buckets and activations are), each the median of its estimates."""
    a, b = 2 * (R - 1), 2 * (R - 1) / R
    small = sorted(t / a for n, t in points if 0 < n <= 4096)
    alpha = small[len(small) // 2]
    large = sorted((t - a * alpha) / (b * n) for n, t in points if n >= 1 << 20)
    return alpha, large[len(large) // 2]


def main():
    shape, rows, sweep = parse(sys.argv[1])
    d, m, N, L, B = (shape[k] for k in "dmNLB")
    print(f"workload: d {d}, m {m}, N {N}, L {L}, global batch B {B}, float\n")
    print("| R | α (µs) | 1/β (GB/s) | worst relative error of the model, 1–32 MB |")
    print("|---|---|---|---|")
    fits = {}
    for R in sorted(sweep):
        if R == 1:
            continue
        alpha, beta = fit(sweep[R], R)
        fits[R] = (alpha, beta)
        worst = max(abs(ring(n, R, alpha, beta) - t) / t for n, t in sweep[R] if n >= 1 << 20)
        print(f"| {R} | {alpha * 1e6:.2f} | {1 / beta / 1e9:.1f} | {worst:.0%} |")

    data = "data, 4 blocks, MPI_Allreduce in finish()"
    bucket = 4 << 20
    print("\nmodel against measurement, communication per step (ms): the all-reduces by the fitted model, plus")
    print("the copies in and out of the buckets (data) or the sums' bookkeeping (tensor) measured at R = 1\n")
    print("| scheme | R | measured | model | of which all-reduce |")
    print("|---|---|---|---|---|")
    for scheme in (data, "tensor"):
        base = rows[(scheme, 1)]["comm"] if (scheme, 1) in rows else 0.0
        for R in sorted(fits):
            if (scheme, R) not in rows:
                continue
            r = rows[(scheme, R)]
            alpha, beta = fits[R]
            if scheme == data:
                n, full = r["bytes"], int(r["bytes"]) // bucket
                ar = full * ring(bucket, R, alpha, beta) + ring(n - full * bucket, R, alpha, beta)
            else:
                act = B * L * d * 4  # y and dx; the router's gradients are small
                ar = 2 * ring(act, R, alpha, beta) + ring(r["bytes"] - 2 * act, R, alpha, beta)
            print(f"| {scheme} | {R} | {r['comm'] * 1e3:.2f} | {(base + ar) * 1e3:.2f} | {ar * 1e3:.2f} |")

    # extension: compute per process from the measured 1-thread runs, communication by the model
    c_data = rows[(data, 1)]["compute"] / 4  # one block, the whole batch, one process
    c_tensor = rows[("tensor", 1)]["compute"]
    grads = rows[(data, 1)]["bytes"] / 4
    act = B * L * d * 4
    print(f"\nextension to 8–64 processes, one per node, α = {NET_ALPHA * 1e6:.0f} µs, 1/β = {1 / NET_BETA / 1e9:.1f} GB/s;")
    print("one block per step (ms): compute shrinks as 1/R (data: B/R examples each, at most B processes; tensor:")
    print("an m/R slice each, at most m processes), communication from the model, nothing overlapped\n")
    print("| R | data: compute | data: all-reduce | data: step | tensor: compute | tensor: all-reduces | tensor: step |")
    print("|---|---|---|---|---|---|---|")
    for R in (1, 2, 4, 8, 16, 32, 64):
        dc = c_data / R if R <= B else float("nan")
        da = ring(grads, R, NET_ALPHA, NET_BETA)
        tc = c_tensor / R if R <= m else float("nan")
        ta = 2 * ring(act, R, NET_ALPHA, NET_BETA)
        print(f"| {R} | {dc * 1e3:.2f} | {da * 1e3:.2f} | {(dc + da) * 1e3:.2f} | {tc * 1e3:.2f} | {ta * 1e3:.2f} | "
              f"{(tc + ta) * 1e3:.2f} |")

    # Lory-scale experts: d 4096, m 14336, N 8, one sequence of 4096 tokens per process and step
    # (data) or the same batch on every slice (tensor); compute at this machine's measured rate
    flops_key = 3 * 2 * 2 * B * L * d * m  # fwd+bwd of the merged adapters (two GEMMs, ×3)
    rate = flops_key / c_tensor  # FLOP/s one process reached on the benchmark's tensor step
    D, M, Lt = 4096, 14336, 4096
    P = 2 * D * M + M
    flops = 3 * 2 * 2 * Lt * D * M + 3 * 2 * N * P  # the expert's GEMMs and the merge (+ its backward)
    print(f"\nLory scale: d {D}, m {M}, N {N}, one sequence of {Lt} tokens per step, at the {rate / 1e9:.0f} GFLOP/s one")
    print(f"process reached here; each expert has {P / 1e6:.0f} M parameters, the bank {N * P * 4 / 1e9:.2f} GB in float\n")
    print("| R | data: per-process bank (GB) | data: compute (ms) | data: all-reduce (ms) | tensor: per-process bank (GB) | tensor: compute (ms) | tensor: all-reduces (ms) |")
    print("|---|---|---|---|---|---|---|")
    for R in (1, 2, 4, 8, 16, 32, 64):
        print(f"| {R} | {N * P * 4 / 1e9:.2f} | {flops / rate * 1e3:.0f} | {ring(N * P * 4, R, NET_ALPHA, NET_BETA) * 1e3:.0f} | "
              f"{N * P * 4 / R / 1e9:.2f} | {flops / R / rate * 1e3:.0f} | {2 * ring(Lt * D * 4, R, NET_ALPHA, NET_BETA) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
