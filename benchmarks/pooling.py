"""Forward+backward time of gated ABMIL pooling: graphmil (one graph-batched pass) against a per-bag
loop with batch size 1 (the seed repositories' way) and torchmil's ``ABMIL`` on padded batches.

All three variants compute the same function with the same weights: instance embedding
``Linear(D, 512) + ReLU``, gated attention (hidden 128), ``Linear(512, 1)`` classifier, BCE loss
averaged over the bags, then ``backward()``. The script checks that the three give the same bag
logits and gradients before timing them.

    python benchmarks/pooling.py --quick     # < 1 min
    python benchmarks/pooling.py             # 64 bags, lognormal sizes (median 1000) clipped to 100..20k, D = 1024

Writes ``docs/benchmarks/pooling.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graphmil.nn.aggr import AttentionAggregation


def bag_sizes(num_bags: int, median: float, sigma: float, lo: int, hi: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.normal(np.log(median), sigma, size=num_bags))
    return [int(s) for s in np.clip(np.round(sizes), lo, hi)]


class GraphMILABMIL(nn.Module):
    """graphmil: one pass over the concatenated instances of all bags."""

    def __init__(self, in_dim: int, embed_dim: int = 512, att_dim: int = 128) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU())
        self.pool = AttentionAggregation(embed_dim, att_dim, gated=True)
        self.classifier = nn.Linear(embed_dim, 1)

    def forward(self, x, index, num_bags):
        return self.classifier(self.pool(self.embed(x), index, dim_size=num_bags)).view(-1)


class SeedABMIL(nn.Module):
    """The seed repositories' gated ABMIL (CLAM / ACMIL / AEM style), one bag at a time."""

    def __init__(self, ref: GraphMILABMIL) -> None:
        super().__init__()
        self.ref = ref  # share the weights

    def forward(self, x):  # x [N, D], one bag
        h = self.ref.embed(x)
        p = self.ref.pool
        a = p.w(torch.tanh(p.V(h)) * torch.sigmoid(p.U(h)))  # N x 1
        a = F.softmax(a.transpose(1, 0), dim=1)  # 1 x N
        return self.ref.classifier(a @ h).view(-1)


def build_torchmil(ref: GraphMILABMIL, in_dim: int):
    from torchmil.models import ABMIL

    feat_ext = nn.Sequential(nn.Linear(in_dim, ref.embed[0].out_features), nn.ReLU())
    model = ABMIL(in_shape=(in_dim,), att_dim=ref.pool.hidden_channels, att_act="tanh", gated=True,
                  feat_ext=feat_ext, criterion=nn.BCEWithLogitsLoss())
    with torch.no_grad():
        model.feat_ext[0].weight.copy_(ref.embed[0].weight)
        model.feat_ext[0].bias.copy_(ref.embed[0].bias)
        model.pool.fc1.module.weight.copy_(ref.pool.V.weight)
        model.pool.fc1.module.bias.copy_(ref.pool.V.bias)
        model.pool.fc_gated.module.weight.copy_(ref.pool.U.weight)
        model.pool.fc_gated.module.bias.copy_(ref.pool.U.bias)
        model.pool.fc2.weight.copy_(ref.pool.w.weight)
        model.classifier.module.weight.copy_(ref.classifier.weight)
        model.classifier.module.bias.copy_(ref.classifier.bias)
    return model


def pad(xs: list[torch.Tensor]):
    n_max = max(x.size(0) for x in xs)
    X = xs[0].new_zeros(len(xs), n_max, xs[0].size(1))
    mask = torch.zeros(len(xs), n_max)
    for i, x in enumerate(xs):
        X[i, : x.size(0)] = x
        mask[i, : x.size(0)] = 1
    return X, mask


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 small bags (< 1 min)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 3)")
    ap.add_argument("--torchmil-batch", type=int, default=None,
                    help="bags per padded torchmil batch (default: 16, quick: all)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks", "pooling.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    args.repeats = args.repeats or 3

    if args.quick:
        num_bags, dim, lo, hi = 8, 1024, 100, 2000
        sizes = bag_sizes(num_bags, 400, 1.0, lo, hi, 0)
    else:
        num_bags, dim, lo, hi = 64, 1024, 100, 20000
        sizes = bag_sizes(num_bags, 1000, 1.0, lo, hi, 0)  # median 1000, total ~103k
    tm_batch = args.torchmil_batch or (num_bags if args.quick else 16)
    xs = [torch.randn(n, dim) for n in sizes]
    y = torch.randint(0, 2, (num_bags,)).float()
    x_cat = torch.cat(xs)
    index = torch.repeat_interleave(torch.arange(num_bags), torch.tensor(sizes))
    chunks = [list(range(i, min(i + tm_batch, num_bags))) for i in range(0, num_bags, tm_batch)]
    padded = [(pad([xs[i] for i in c]), y[c]) for c in chunks]

    ref = GraphMILABMIL(dim)
    seed = SeedABMIL(ref)
    try:
        tmil = build_torchmil(ref, dim)
    except ImportError:
        tmil = None
        print("torchmil not installed (pip install 'graphmil[bench]'): skipping it", file=sys.stderr)

    def run_graphmil():
        ref.zero_grad(set_to_none=True)
        logits = ref(x_cat, index, num_bags)
        F.binary_cross_entropy_with_logits(logits, y).backward()
        return logits.detach()

    def run_loop():
        ref.zero_grad(set_to_none=True)
        out = []
        for x, t in zip(xs, y):
            logit = seed(x)
            (F.binary_cross_entropy_with_logits(logit, t.view(1)) / num_bags).backward()
            out.append(logit.detach())
        return torch.cat(out)

    def run_torchmil():
        tmil.zero_grad(set_to_none=True)
        out = []
        for (X, mask), t in padded:
            logit = tmil(X, mask)
            (F.binary_cross_entropy_with_logits(logit, t, reduction="sum") / num_bags).backward()
            out.append(logit.detach())
        return torch.cat(out)

    # correctness: same logits and same embedding gradient
    checks = {}
    l_g = run_graphmil()
    g_g = ref.embed[0].weight.grad.clone()
    l_l = run_loop()
    checks["loop"] = (float((l_l - l_g).abs().max()), float((ref.embed[0].weight.grad - g_g).abs().max()))
    variants = [("graphmil (one batched pass)", run_graphmil), ("per-bag loop, batch size 1", run_loop)]
    if tmil is not None:
        l_t = run_torchmil()
        checks["torchmil"] = (float((l_t - l_g).abs().max()), float((tmil.feat_ext[0].weight.grad - g_g).abs().max()))
        variants.append((f"torchmil ABMIL, padded batches of {tm_batch}", run_torchmil))

    # round-robin over the variants (so load changes on a shared machine hit all of them), min time
    # the correctness check above already ran every variant once (warm-up)
    samples = {name: [] for name, _ in variants}
    for _ in range(args.repeats):
        for name, fn in variants:
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    times = {name: min(ts) for name, ts in samples.items()}
    for name, _ in variants:
        print(f"{name:45s} min {times[name]:8.3f} s   median {statistics.median(samples[name]):8.3f} s", flush=True)

    base = times[variants[0][0]]
    n_tot = sum(sizes)
    pad_rows = sum(len(c) * max(sizes[i] for i in c) for c in chunks)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    cmd = "python benchmarks/pooling.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    lines = [
        "# Pooling benchmark: gated ABMIL forward + backward",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: `{platform.platform()}`, {platform.processor() or platform.machine()}, "
        f"CPU count {os.cpu_count()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
        f"Python {platform.python_version()}; load average at the end {load}."
        + (" The machine was shared with other jobs: ratios are noisy." if os.getloadavg()[0] > 1.5 else ""),
        "",
        f"Workload: {num_bags} bags, D = {dim}, sizes lognormal clipped to {lo}..{hi} "
        f"(min {min(sizes)}, median {int(np.median(sizes))}, max {max(sizes)}, total N = {n_tot}); "
        f"padded rows for torchmil: {pad_rows} ({pad_rows / n_tot:.2f}x). Each variant: "
        "Linear(1024, 512) + ReLU, gated attention (L = 128), Linear(512, 1), BCE, backward; "
        f"minimum of {args.repeats} round-robin runs after one warm-up run (the agreement check).",
        "",
        "| variant | time (s) | ratio to graphmil (>1: graphmil faster) |",
        "|---|---:|---:|",
    ]
    for name, _ in variants:
        lines.append(f"| {name} | {times[name]:.3f} | {times[name] / base:.2f} |")
    lines.append("")
    lines.append("Agreement with graphmil (max |Δ bag logit|, max |Δ grad of the embedding weight|): "
                 + ", ".join(f"{k}: {a:.1e}, {b:.1e}" for k, (a, b) in checks.items()) + ".")
    text = "\n".join(lines) + "\n"
    print()
    for name, _ in variants[1:]:
        print(f"graphmil speed-up over {name}: {times[name] / base:.2f}x")
    print("agreement:", checks)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
