#!/usr/bin/python3
"""Runs smear_bench and bench/compare_pytorch.py back to back and prints bench/RESULTS.md's table.

    cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release -DSMEAR_BUILD_BENCHMARKS=ON
    cmake --build build-bench -j2 --target smear_bench
    /usr/bin/python3 bench/compare.py --bench build-bench/bench/smear_bench > table.md

For every workload: smear's median time, PyTorch's median time, their ratio, the median time of
the plain Eigen GEMMs of the same shapes (measured in the same run: the ceiling) and the share
of that ceiling smear reaches. Then the issue's targets, each computed from the numbers above,
and the peak resident memory of a process running only the key workload, for both.
Progress goes to stderr; the table to stdout. The default set runs in a few minutes; pass
workload names (as smear_bench prints them) to choose others, or --threads to change the
thread count of the default set. PyTorch is optional: without it the PyTorch columns are empty.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = "d:768/m:64/N:8/L:128/B:32"


def default_workloads(threads):
    t = f"threads:{threads}"
    w = []
    for mode in ("fwdbwd", "fwd"):
        for kind in ("smear", "top1", "ensemble", "single"):
            w.append(f"{kind}/{mode}/{KEY}/{t}")
    w += [
        f"smear/fwdbwd/{KEY}/threads:1",
        f"smear/fwdbwd/d:768/m:24/N:8/L:128/B:32/{t}",
        f"smear/fwdbwd/d:512/m:32/N:8/L:128/B:32/{t}",
        f"smear/fwdbwd/d:768/m:64/N:32/L:128/B:32/{t}",
        f"smear/fwdbwd/d:768/m:64/N:8/L:128/B:1/{t}",
        f"smear/fwd/d:768/m:24/N:8/L:1/B:32/{t}",
        f"cached/fwd/d:768/m:24/N:8/L:1/B:32/{t}",
        f"single/fwd/d:768/m:24/N:8/L:1/B:32/{t}",
    ]
    return w


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def gemm_name(name):
    """The ceiling of a smear or single workload: the same GEMMs without the rest."""
    kind, rest = name.split("/", 1)
    if kind == "smear":
        return "gemm/" + rest
    if kind == "single":
        return "gemm/" + re.sub(r"/N:\d+/", "/N:1/", rest)
    return None


def bench_name(name):
    """smear_bench registers single adapters under N:1."""
    return re.sub(r"/N:\d+/", "/N:1/", name) if name.startswith("single/") else name


def run_smear(bench, names, repetitions, min_time, env):
    pattern = "^(" + "|".join(re.escape(bench_name(n)) + "/" for n in names) + ")"
    cmd = [bench, f"--benchmark_filter={pattern}", f"--benchmark_repetitions={repetitions}",
           "--benchmark_report_aggregates_only=true", f"--benchmark_min_time={min_time}",
           "--benchmark_enable_random_interleaving=true",
           "--benchmark_format=json"]
    log("running", " ".join(cmd[:1]), f"({len(names)} workloads, {repetitions} repetitions)")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    result = {}
    for b in json.loads(out)["benchmarks"]:
        # the median of the repetitions (a single repetition has no aggregates)
        if b.get("aggregate_name") != "median" and not (repetitions == 1 and b.get("run_type") == "iteration"):
            continue
        name = re.sub(r"(/process_time)?(/real_time)?$", "", b["run_name"])
        if b.get("error_occurred"):
            continue
        scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b["time_unit"]]
        result[name] = dict(b, wall_ms=b["real_time"] * scale, cpu_ms=b["cpu_time"] * scale)
    return result


def run_pytorch(python, names, repetitions, min_time, env):
    script = os.path.join(HERE, "compare_pytorch.py")
    result = {}
    for name in names:
        log("running PyTorch", name)
        p = subprocess.run([python, script, name, f"--repetitions={repetitions}", f"--min-time={min_time}"],
                           capture_output=True, text=True, env=env)
        if p.returncode != 0:
            log("PyTorch failed:", p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode)
            return result
        r = json.loads(p.stdout.strip().splitlines()[-1])
        result[name] = dict(r, wall_ms=r["ms"])
    return result


def peak_rss_mib(cmd, env):
    """Peak resident memory of a child process running `cmd`, in MiB."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        return None
    return usage.ru_maxrss / 1024.0


def cpu_model():
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def torch_info(python, env):
    code = ("import torch, re\n"
            "blas = sorted({l.split()[-1] for l in open('/proc/self/maps') if re.search(r'lib(open)?blas', l)})\n"
            "print(torch.__version__, ' '.join(blas) or 'no separate BLAS')")
    p = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
    return p.stdout.strip() if p.returncode == 0 else None


def fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", help="workload names (default: the set in RESULTS.md)")
    parser.add_argument("--bench", default=os.path.join(HERE, "..", "build-bench", "bench", "smear_bench"))
    parser.add_argument("--python", default="/usr/bin/python3", help="a Python with torch")
    parser.add_argument("--threads", type=int, default=2, help="threads of the default set")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per repetition")
    parser.add_argument("--wait-policy", default="passive",
                        help="OMP_WAIT_POLICY for PyTorch's OpenMP ('' keeps the environment's); "
                             "passive keeps its idle threads from spinning on a shared machine (smear's "
                             "own pool waits passively whatever it says)")
    parser.add_argument("--no-pytorch", action="store_true")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time (the default; needs a quiet machine); cpu: the "
                             "process's CPU time over all its threads, which other jobs on the "
                             "machine disturb much less (with 1 thread it estimates a quiet wall time)")
    args = parser.parse_args()

    bench = os.path.abspath(args.bench)
    if not os.access(bench, os.X_OK):
        sys.exit(f"compare.py: no benchmark executable at {bench}; build the smear_bench target "
                 "with -DSMEAR_BUILD_BENCHMARKS=ON, or pass --bench")
    env = dict(os.environ)
    if args.wait_policy:
        env["OMP_WAIT_POLICY"] = args.wait_policy
    names = args.workloads or default_workloads(args.threads)
    for n in names:
        if not re.match(r"^(smear|top1|ensemble|single|cached)/(fwd|fwdbwd)/d:\d+/m:\d+/N:\d+/L:\d+/B:\d+/threads:\d+$", n):
            sys.exit(f"compare.py: cannot read workload name '{n}'")
    have_torch = not args.no_pytorch and shutil.which(args.python) and torch_info(args.python, env)

    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    wanted = sorted(set(names) | {g for g in map(gemm_name, names) if g})
    ours = run_smear(bench, wanted, args.repetitions, args.min_time, env)
    # PyTorch has no merged-expert cache: its "cached" row would be smear's again
    theirs = run_pytorch(args.python, [n for n in names if not n.startswith("cached/")], args.repetitions,
                         args.min_time, env) if have_torch else {}
    load_after = os.getloadavg()

    key = f"smear/fwdbwd/{KEY}/threads:{args.threads}"
    log("measuring peak memory of", key)
    rss_ours = peak_rss_mib([bench, f"--benchmark_filter=^{re.escape(key)}/", "--benchmark_min_time=0.05"], env)
    rss_theirs = rss_torch_idle = None
    if have_torch:
        rss_theirs = peak_rss_mib([args.python, os.path.join(HERE, "compare_pytorch.py"), key,
                                   "--repetitions=1", "--min-time=0.05"], env)
        rss_torch_idle = peak_rss_mib([args.python, "-c", "import torch"], env)

    clock = args.clock + "_ms"

    def ms(table, name):
        return table.get(bench_name(name) if table is ours else name, {}).get(clock)

    print(f"Run {started:%Y-%m-%d %H:%M} UTC on {cpu_model()}, {os.cpu_count()} cores; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY', '(unset)')}; "
          f"{args.repetitions} repetitions, medians of {'wall-clock' if args.clock == 'wall' else 'process CPU'} time.")
    print(f"PyTorch: {have_torch or 'not run'}.")
    print()
    print("| workload | smear ms | PyTorch ms | PyTorch / smear | GEMM ceiling ms | share of ceiling |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for n in names:
        a, b = ms(ours, n), ms(theirs, n)
        g = gemm_name(n)
        c = ours.get(g, {}).get(clock) if g else None
        print(f"| {n} | {fmt(a)} | {fmt(b)} | {fmt(b / a if a and b else None)} | {fmt(c)} | "
              f"{fmt(c / a * 100 if a and c else None, '.0f')}{'%' if a and c else ''} |")
    print()

    t = f"threads:{args.threads}"
    sm, t1, en = (ms(ours, f"{k}/fwdbwd/{KEY}/{t}") for k in ("smear", "top1", "ensemble"))
    smf, t1f, enf = (ms(ours, f"{k}/fwd/{KEY}/{t}") for k in ("smear", "top1", "ensemble"))
    pt = ms(theirs, f"smear/fwdbwd/{KEY}/{t}")
    ceiling = ours.get(gemm_name(key), {}).get(clock)
    ws = ours.get(key, {}).get("workspace_ratio")
    l1 = "fwd/d:768/m:24/N:8/L:1/B:32/" + t
    l1s, l1c, l1a = ms(ours, "smear/" + l1), ms(ours, "cached/" + l1), ms(ours, "single/" + l1)

    def ratio(a, b):
        return a / b if a and b else None

    print("| target (key workload: d=768, m=64, N=8, L=128, B=32) | wanted | measured |")
    print("| --- | --- | --- |")
    print(f"| PyTorch / smear, forward+backward, threads: {args.threads} | ≥ 2 | {fmt(ratio(pt, sm))} |")
    print(f"| smear / top-1, forward+backward (forward only) | ≤ 1.10 | {fmt(ratio(sm, t1))} ({fmt(ratio(smf, t1f))}) |")
    print(f"| ensemble / smear, forward+backward (forward only) | ≥ 5 | {fmt(ratio(en, sm))} ({fmt(ratio(enf, smf))}) |")
    print(f"| share of the GEMM ceiling, forward+backward | ≥ 70% | "
          f"{fmt(ceiling / sm * 100 if ceiling and sm else None, '.0f')}% |")
    print(f"| workspace / (B merged vectors + saved activations) | ≤ 1.5 | {fmt(ws)} |")
    print(f"| L = 1, B = 32, m = 24, N = 8, forward: cached merge / single adapter (uncached smear) | ≤ 1.2 | "
          f"{fmt(ratio(l1c, l1a))} ({fmt(ratio(l1s, l1a))}) |")
    print(f"| peak resident memory of a process running the key workload, MiB | — | smear {fmt(rss_ours, '.0f')}, "
          f"PyTorch {fmt(rss_theirs, '.0f')} (of which {fmt(rss_torch_idle, '.0f')} after `import torch` alone) |")


if __name__ == "__main__":
    main()
