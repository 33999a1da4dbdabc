"""CASii pooling: folded saliency ``s = Q̂ (Σ_j w_j k̂_j)`` vs the explicit ``N × τ`` cosine matrix.

Times the forward pass of :class:`graphmil.nn.aggr.CASiiAggregation` (``attend``, folded) and of
its explicit-matrix reference (``attend_explicit``, the released CASii code's form) side by side,
with ``τ = 8,000`` keys and ``D = 1024`` features, and measures the **peak extra memory** of each
configuration: before each configuration the freed heap is returned to the OS (``malloc_trim``)
and the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``); the peak extra memory is
``VmHWM`` after the warm-up and timed runs minus ``VmRSS`` once the inputs, keys and module exist.
Without ``clear_refs`` each configuration runs in a fresh subprocess and uses ``ru_maxrss``. Two modes: ``inference`` (``torch.no_grad``) and ``train``
(forward with the autograd graph kept, i.e. what a training step holds before ``backward``).

The explicit path is run only where its ``N × τ`` float32 matrix fits the budget
``--explicit-budget-gb`` (default 2 GB: N = 10k → 0.32 GB and 50k → 1.6 GB run, 200k → 6.4 GB is
skipped). Writes ``docs/benchmarks/casii.md``.

    python benchmarks/casii.py --quick     # N = 2k / 10k, < 1 min
    python benchmarks/casii.py             # N = 10k / 50k / 200k, a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "benchmarks", "casii.md")


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def _reset_peak() -> bool:
    """Return freed heap to the OS and reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def build(n: int, tau: int, dim: int, hidden: int):
    import torch

    from graphmil.nn.aggr import CASiiAggregation

    torch.manual_seed(0)
    pool = CASiiAggregation(dim, torch.randn(tau, dim), hidden_channels=hidden)
    x = torch.randn(n, dim)
    index = torch.zeros(n, dtype=torch.long)
    index[n // 2:] = 1  # two bags
    return pool, x, index


def measure(pool, x, index, path: str, mode: str, repeats: int, in_process: bool) -> dict:
    """Median forward time and peak extra memory (MB) of one configuration."""
    import torch

    fn = pool.attend if path == "folded" else pool.attend_explicit
    if in_process:
        _reset_peak()
        base = _status_mb("VmRSS")
    else:
        base = _maxrss_mb()
    times = []
    for i in range(repeats + 1):  # first run = warm-up
        t0 = time.perf_counter()
        if mode == "inference":
            with torch.no_grad():
                out = fn(x, index, dim_size=2)
        else:
            out = fn(x, index, dim_size=2)
        dt = time.perf_counter() - t0
        del out
        if i > 0:
            times.append(dt)
    peak = _status_mb("VmHWM") if in_process else _maxrss_mb()
    return {"time_s": statistics.median(times), "peak_extra_mb": peak - base}


def worker(n, tau, dim, hidden, path, mode, repeats, threads) -> dict:
    import torch

    torch.set_num_threads(threads)
    pool, x, index = build(n, tau, dim, hidden)
    return measure(pool, x, index, path, mode, repeats, in_process=False)


def run_config(args, n: int, path: str, mode: str) -> dict:
    """Fallback without /proc/self/clear_refs: one fresh subprocess per configuration."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(n), path, mode,
           "--keys", str(args.keys), "--dim", str(args.dim), "--hidden", str(args.hidden),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"worker {n} {path} {mode} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 2k / 10k instead of 10k / 50k / 200k")
    ap.add_argument("--sizes", type=int, nargs="*", help="instance counts N (overrides --quick)")
    ap.add_argument("--keys", type=int, default=8000, help="τ (default 8000)")
    ap.add_argument("--dim", type=int, default=1024, help="D (default 1024)")
    ap.add_argument("--hidden", type=int, default=512, help="D_h (default 512)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per config (default 1 quick / 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--modes", default="inference,train", help="comma list of inference,train")
    ap.add_argument("--explicit-budget-gb", type=float, default=2.0,
                    help="run the explicit path only if its N×τ float32 matrix is at most this (default 2)")
    ap.add_argument("--out", default=OUT, help="markdown table path (default docs/benchmarks/casii.md)")
    ap.add_argument("--worker", nargs=3, metavar=("N", "PATH", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2

    if args.worker:
        n, path, mode = int(args.worker[0]), args.worker[1], args.worker[2]
        print(json.dumps(worker(n, args.keys, args.dim, args.hidden, path, mode, args.repeats, args.threads)))
        return

    import torch

    torch.set_num_threads(args.threads)
    in_process = _reset_peak()
    sizes = args.sizes or ([2_000, 10_000] if args.quick else [10_000, 50_000, 200_000])
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows = []
    print(f"{'N':>8} {'mode':>9} {'C GB':>6} {'folded s':>9} {'explicit s':>10} {'time x':>7} "
          f"{'folded MB':>10} {'explicit MB':>11} {'mem x':>6}")
    for n in sizes:
        c_gb = n * args.keys * 4 / 1e9
        if in_process:
            pool, x, index = build(n, args.keys, args.dim, args.hidden)
            run = lambda path, mode: measure(pool, x, index, path, mode, args.repeats, True)  # noqa: E731
        else:
            run = lambda path, mode: run_config(args, n, path, mode)  # noqa: E731
        for mode in modes:
            f = run("folded", mode)
            e = run("explicit", mode) if c_gb <= args.explicit_budget_gb else None
            row = dict(n=n, mode=mode, c_gb=c_gb, folded=f, explicit=e)
            rows.append(row)
            et = f"{e['time_s']:.3f}" if e else "skipped"
            em = f"{e['peak_extra_mb']:.0f}" if e else "skipped"
            tr = f"{e['time_s'] / f['time_s']:.1f}" if e else "-"
            mr = f"{e['peak_extra_mb'] / max(f['peak_extra_mb'], 1):.1f}" if e else "-"
            print(f"{n:>8} {mode:>9} {c_gb:>6.2f} {f['time_s']:>9.3f} {et:>10} {tr:>7} "
                  f"{f['peak_extra_mb']:>10.0f} {em:>11} {mr:>6}", flush=True)
        pool = x = index = run = None

    cmd = " ".join(["python benchmarks/casii.py"] + list(sys.argv[1:] if argv is None else argv))
    lines = [
        "# CASii pooling: folded saliency vs explicit N × τ matrix",
        "",
        "Forward pass of `CASiiAggregation.attend` (folded, `s_i = q̂_iᵀ Σ_j w_j k̂_j + b`) and",
        "`attend_explicit` (forms `C = Q̂ K̂ᵀ`, `N × τ`, as the released CASii code) on the same inputs:",
        f"τ = {args.keys} keys, D = {args.dim}, D_h = {args.hidden}, two bags of N/2 instances. Time = median",
        f"of {args.repeats} run(s) after a warm-up. Peak extra memory = growth of the peak RSS during the runs",
        "(" + ("`VmHWM` reset per configuration via `/proc/self/clear_refs`" if in_process
               else "`ru_maxrss` in a fresh subprocess per configuration")
        + ") beyond the inputs (`x` is N × D float32: 0.8 GB at N = 200k),",
        "keys and weights. `inference` = under `torch.no_grad()`; `train` = forward keeping the autograd graph.",
        f"The explicit path runs only where `C` (N × τ float32) is at most {args.explicit_budget_gb:g} GB.",
        "`time ×` and `memory ×` = explicit / folded.",
        "",
        "| N | mode | C (GB) | folded time (s) | explicit time (s) | time × | folded peak extra (MB) "
        "| explicit peak extra (MB) | memory × |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f, e = r["folded"], r["explicit"]
        lines.append(
            f"| {r['n']:,} | {r['mode']} | {r['c_gb']:.2f} | {f['time_s']:.3f} | "
            + (f"{e['time_s']:.3f} | {e['time_s'] / f['time_s']:.1f} | " if e else "skipped | – | ")
            + f"{f['peak_extra_mb']:.0f} | "
            + (f"{e['peak_extra_mb']:.0f} | {e['peak_extra_mb'] / max(f['peak_extra_mb'], 1):.1f} |"
               if e else "skipped | – |"))
    big = [r for r in rows if r["n"] == max(sizes)]
    worst = max(r["folded"]["peak_extra_mb"] for r in big)
    summary = (f"Folded path at N = {max(sizes):,}: peak extra memory {worst / 1024:.2f} GB "
               f"({'under' if worst < 2048 else 'OVER'} the 2 GB target); the explicit `C` alone would be "
               f"{big[0]['c_gb']:.1f} GB.")
    lines += [
        "",
        summary,
        "",
        f"Machine: `{platform.platform()}`, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs ({args.threads} torch threads), Python {platform.python_version()}, "
        f"torch {torch.__version__}.",
        "",
        f"Command: `{cmd.strip()}`",
        "",
    ]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))
    print(f"\n{summary}\nwrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
