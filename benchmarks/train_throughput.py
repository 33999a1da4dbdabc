"""Training throughput of graphmil's models against torchmil and a batch-size-1 loop, in one run.

One *optimizer step* = forward on the whole batch + the model's loss terms
(``sum(model.losses(out, batch).values())``) + backward + ``Adam.step()`` — for graphmil exactly
``graphmil.train.train_step``, the step the engine runs. Three ways of training on
the same bags, with the same hyperparameters:

- ``graphmil``: one PyG ``Batch`` of all bags (instances concatenated, block-diagonal edges), one
  step per batch;
- ``torchmil``: torchmil's equivalent model (``ABMIL``, ``SmABMIL``, ``SmTransformerABMIL``) on a
  padded batch ``X [B, N_max, D]`` with its ``mask [B, N_max]`` and the normalised adjacency as a
  sparse COO tensor ``[B, N_max, N_max]`` (what ``torchmil.data.collate_fn`` builds), one step per
  batch, loss from ``model.compute_loss``;
- ``loop``: the graphmil model fed one bag at a time with one optimizer step per bag (batch size
  1, the way the seed repositories train); its "pass" is the time to go once over all bags.

Data: ``graphmil.datasets.SyntheticBags`` (log-uniform bag sizes, 8-neighbour grid edges).
Graph preprocessing (normalised adjacency for torchmil, CASii's negative key bank via
``model.prepare``) is done before timing, as a data loader or trainer would. graphmil's Sm
normalises the adjacency inside ``forward`` (by design, never cached), so that cost is timed.

Memory: peak resident set size during the timed steps, measured by resetting the kernel's
high-water mark (``/proc/self/clear_refs`` ← ``5``) after setup and reading ``VmHWM`` after the
steps; reported as the increase over the resident size before the steps (the model's working
memory, not the data). Without ``/proc`` it falls back to ``ru_maxrss``. Each configuration runs
in a fresh subprocess by default (``--no-isolate`` runs them in-process, as ``--quick`` does to save
interpreter start-ups).

Usage::

    python benchmarks/train_throughput.py --quick            # < 1 min, small mix
    python benchmarks/train_throughput.py                    # full table (< 6 min on 2 cores)
    python benchmarks/train_throughput.py --scaling          # step time / memory vs size
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from graphmil.train.step import train_step  # noqa: E402  (the one step the engine runs too)

MODELS = ["abmil", "smap", "smtap", "casii", "ainet"]
TORCHMIL = {"abmil": "ABMIL", "smap": "SmABMIL", "smtap": "SmTransformerABMIL"}

# Shared hyperparameters: embedding 512, attention 128, Sm T = 10 with learnable alpha initialised
# at 0.5, transformer 2 layers x 8 heads x width 512 (pre-LN, no MLP), spectral norm after Sm.
EMBED, ATT, SM_STEPS, SM_ALPHA, TF_LAYERS, TF_HEADS = 512, 128, 10, 0.5, 2, 8

GRAPHMIL_KWARGS: Dict[str, dict] = {
    "abmil": dict(embed_dim=EMBED, attention_dim=ATT, gated=True),
    "smap": dict(embed_dim=EMBED, hidden_channels=ATT, K=SM_STEPS, alpha=SM_ALPHA, learn_alpha=True,
                 where="early", spectral_norm=True, mode="approx"),
    "smtap": dict(embed_dim=EMBED, hidden_channels=ATT, K=SM_STEPS, alpha=SM_ALPHA, learn_alpha=True,
                  where="early", spectral_norm=True, mode="approx", num_layers=TF_LAYERS,
                  heads=TF_HEADS),
    "casii": dict(hidden_channels=EMBED),
    "ainet": dict(attention_dim=ATT),
}

# The data mixes: (num_bags, min_instances, max_instances, D, seed). The models with bag-local
# self-attention (SmTAP's transformer: quadratic in the bag size; AINet's region correction) use a
# smaller mix, the same for every way they are compared, so that the full run fits in 6 minutes.
MIX = {
    "full": dict(num_bags=16, min_instances=1000, max_instances=30000, D=512, seed=7),
    "full_small": dict(num_bags=8, min_instances=500, max_instances=4000, D=512, seed=7),
    "quick": dict(num_bags=4, min_instances=300, max_instances=3000, D=128, seed=0),
    "quick_small": dict(num_bags=3, min_instances=100, max_instances=600, D=128, seed=0),
}
SMALL_MIX_MODELS = ("smtap", "ainet")

# glibc's malloc serves allocations above a (dynamic, at most 32 MB) threshold with fresh mmap()s,
# whose pages the kernel faults in and zeroes on first touch: on CPU, a step that allocates many
# [N, 512] temporaries for N ~ 10^5 then spends most of its time in page faults (system time). These
# settings keep such tensors on the heap and reuse them (at the price of a higher resident peak).
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184",
                "MALLOC_TOP_PAD_": "1073741824"}


# --------------------------------------------------------------------------- memory
def _rss_kb() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _available_mb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def _trim() -> None:
    """Return freed heap memory to the OS (glibc), so that in-process RSS deltas are meaningful."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # not glibc
        pass


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_kb() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# --------------------------------------------------------------------------- data
def make_bags(num_bags: int, min_instances: int, max_instances: int, D: int, seed: int,
              total: Optional[int] = None):
    """The benchmark's bags: ``SyntheticBags`` with log-uniform sizes (8-neighbour edges).

    With ``total``, the sizes are rescaled so that the bags hold about ``total`` instances (used by
    ``--scaling``)."""
    from graphmil.datasets import SyntheticBags

    if total is not None:
        per = max(1, total // num_bags)
        min_instances, max_instances = max(1, per // 2), max(1, per * 3 // 2)
    ds = SyntheticBags(num_bags=num_bags, num_features=D, seed=seed, min_instances=min_instances,
                       max_instances=max_instances, size_distribution="loguniform",
                       spatial_noise=0.0, in_memory=False)
    bags = []
    for i in range(num_bags):
        b = ds[i]
        bags.append(type(b)(x=b.x, pos=b.pos, edge_index=b.edge_index, y=b.y))
    return bags


_BAGS: Dict[str, list] = {}


def cached_bags(mix: dict, path: Optional[str] = None):
    """The bags of ``mix``, generated once per run: kept in memory, and saved to ``path`` (a file
    the parent writes for its subprocesses) so that every configuration trains on the same bags
    without regenerating them."""
    key = json.dumps(mix, sort_keys=True)
    if key not in _BAGS:
        if path and os.path.exists(path):
            _BAGS[key] = torch.load(path, weights_only=False)
        else:
            _BAGS[key] = make_bags(mix["num_bags"], mix["min_instances"], mix["max_instances"],
                                   mix["D"], mix["seed"], total=mix.get("total"))
            if path:
                torch.save(_BAGS[key], path)
    return [b.clone() for b in _BAGS[key]]


def torchmil_batch(bags):
    """Padded batch the way ``torchmil.data.collate_fn`` builds it (which needs ``tensordict``):
    ``X [B, N_max, D]``, ``mask [B, N_max]``, ``adj`` sparse COO ``[B, N_max, N_max]`` holding
    :math:`D^{-1/2} A D^{-1/2}` per bag (``torchmil.utils.normalize_adj``), ``Y [B]``."""
    B = len(bags)
    n_max = max(b.num_nodes for b in bags)
    D = bags[0].x.size(1)
    X = torch.zeros(B, n_max, D)
    mask = torch.zeros(B, n_max, dtype=torch.uint8)
    adjs = []
    for i, b in enumerate(bags):
        n = b.num_nodes
        X[i, :n] = b.x
        mask[i, :n] = 1
        ei = b.edge_index
        w = torch.ones(ei.size(1))
        deg = torch.zeros(n).index_add_(0, ei[0], w)
        dinv = deg.pow(-0.5)
        dinv[torch.isinf(dinv)] = 0
        val = dinv[ei[0]] * w * dinv[ei[1]]
        if n == 1:  # torchmil adds a self-loop to one-instance bags
            ei, val = torch.zeros(2, 1, dtype=torch.long), torch.ones(1)
        adjs.append(torch.sparse_coo_tensor(ei, val, (n_max, n_max), check_invariants=False).coalesce())
    adj = torch.stack(adjs).coalesce()  # torchmil.data.collate_fn does the same
    Y = torch.stack([b.y.view(()) for b in bags]).float()
    return X, adj, mask, Y


# --------------------------------------------------------------------------- models
def graphmil_model(name: str, D: int):
    from graphmil.models import create_model

    return create_model(name, in_channels=D, num_classes=1, **GRAPHMIL_KWARGS.get(name, {}))


def torchmil_model(name: str, D: int):
    import torchmil.models as tm

    feat_act = torch.nn.ReLU() if name == "abmil" else torch.nn.GELU()
    feat_ext = torch.nn.Sequential(torch.nn.Linear(D, EMBED), feat_act)
    if name == "abmil":
        return tm.ABMIL(in_shape=(D,), att_dim=ATT, att_act="tanh", gated=True, feat_ext=feat_ext)
    if name == "smap":
        return tm.SmABMIL(in_shape=(D,), att_dim=ATT, att_act="tanh", sm_mode="approx",
                          sm_alpha="trainable", sm_steps=SM_STEPS, sm_where="early",
                          spectral_norm=True, feat_ext=feat_ext)
    if name == "smtap":
        return tm.SmTransformerABMIL(
            in_shape=(D,), pool_att_dim=ATT, pool_act="tanh", pool_sm_mode="approx",
            pool_sm_alpha="trainable", pool_sm_steps=SM_STEPS, pool_sm_where="early",
            pool_spectral_norm=True, feat_ext=feat_ext, transf_att_dim=EMBED,
            transf_n_layers=TF_LAYERS, transf_n_heads=TF_HEADS, transf_use_mlp=False,
            transf_add_self=False, transf_sm_alpha="trainable", transf_sm_mode="approx",
            transf_sm_steps=SM_STEPS)
    raise ValueError(f"no torchmil equivalent for '{name}'")


def copy_graphmil_to_torchmil(g, t, name: str) -> None:
    """Copy a graphmil model's weights into its torchmil equivalent (``abmil`` and ``smap``)."""
    gs, ts = g.state_dict(), t.state_dict()
    if name == "abmil":
        pairs = {"embed.0.weight": "feat_ext.0.weight", "embed.0.bias": "feat_ext.0.bias",
                 "pool.V.weight": "pool.fc1.module.weight", "pool.V.bias": "pool.fc1.module.bias",
                 "pool.U.weight": "pool.fc_gated.module.weight", "pool.U.bias": "pool.fc_gated.module.bias",
                 "pool.w.weight": "pool.fc2.weight", "classifier.weight": "classifier.module.weight",
                 "classifier.bias": "classifier.module.bias"}
    else:
        pairs = {"embed.weight": "feat_ext.0.weight", "embed.bias": "feat_ext.0.bias",
                 "pool.V.bias": "pool.proj1.bias", "classifier.weight": "last_layer.weight",
                 "classifier.bias": "last_layer.bias"}
        for k in gs:  # spectral-norm parametrisations: original weight and power-iteration vectors
            if k.startswith("pool.V.parametrizations"):
                pairs[k] = k.replace("pool.V.", "pool.proj1.")
            if k.startswith("pool.w.parametrizations"):
                pairs[k] = k.replace("pool.w.", "pool.proj2.")
    missing = [v for v in pairs.values() if v not in ts]
    if missing:
        raise KeyError(f"torchmil parameters not found: {missing}")
    with torch.no_grad():
        for gk, tk in pairs.items():
            ts[tk].copy_(gs[gk])
        if name == "smap":  # alpha = sigmoid(theta) (graphmil) = 1 / (1 + coef) (torchmil)
            a = g.pool.sm.alpha_value()
            t.pool.sm.sm.coef.copy_((1 - a) / a)
    t.load_state_dict(ts)


def check_equivalence(D: int = 32) -> List[str]:
    """Same weights, same bags: graphmil and torchmil give the same bag logits (``abmil``, ``smap``).

    This is what makes the timing comparison apples-to-apples: both sides compute one function."""
    from torch_geometric.data import Batch

    torch.manual_seed(0)
    bags = make_bags(3, 40, 200, D, 1)
    batch = Batch.from_data_list(bags)
    X, adj, mask, _ = torchmil_batch(bags)
    lines = []
    for name in ("abmil", "smap"):
        g, t = graphmil_model(name, D).eval(), torchmil_model(name, D).eval()
        copy_graphmil_to_torchmil(g, t, name)
        with torch.no_grad():
            yg = g(batch).bag_logits.view(-1)
            yt = t(X, mask) if name == "abmil" else t(X, adj, mask)
        err = float((yg - yt).abs().max())
        lines.append(f"- {name}: max |graphmil − torchmil| bag logit with copied weights = {err:.2e} "
                     f"({'equal' if err < 1e-4 else 'DIFFERENT'})")
    return lines


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- one configuration
def run_config(cfg: dict) -> dict:
    """Set up one (framework, model, mode) configuration, time its steps, measure its memory."""
    from torch_geometric.data import Batch

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    mix = cfg["mix"]
    bags = cached_bags(mix, cfg.get("bags_file"))
    D = mix["D"]
    n_inst = sum(b.num_nodes for b in bags)
    fw, name, mode = cfg["framework"], cfg["model"], cfg["mode"]
    if name == "ainet":  # regions are a per-slide preprocessing step (a transform), not timed
        from graphmil.transforms import RegionPartition

        bags = [RegionPartition()(b) for b in bags]

    if fw == "torchmil":
        model = torchmil_model(name, D)
        X, adj, mask, Y = torchmil_batch(bags)
        del bags

        def one_pass():
            if name == "abmil":
                _, losses = model.compute_loss(Y, X, mask)
            else:
                _, losses = model.compute_loss(Y, X, adj, mask)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return float(loss.detach())
        steps_per_pass = 1
    else:
        model = graphmil_model(name, D)
        model.prepare(bags)  # CASii's negative key bank; a no-op for the others
        if mode == "batched":
            batch = Batch.from_data_list(bags)
            del bags

            def one_pass():
                return train_step(model, batch, opt).loss
            steps_per_pass = 1
        else:
            singles = [Batch.from_data_list([b]) for b in bags]
            del bags

            def one_pass():
                return sum(train_step(model, b, opt).loss for b in singles) / len(singles)
            steps_per_pass = len(singles)

    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gc.collect()
    _trim()
    exact_peak = _reset_peak()
    rss0 = _rss_kb()
    times, losses = [], []
    for i in range(cfg["warmup"] + cfg["steps"]):
        t0 = time.perf_counter()
        losses.append(one_pass())
        dt = time.perf_counter() - t0
        if i >= cfg["warmup"]:
            times.append(dt)
    peak = _peak_kb()
    t = min(times)  # best of the timed passes: the least disturbed by other load on the machine
    return dict(
        framework=fw, model=name, mode=mode, instances=n_inst, bags=mix["num_bags"], D=D,
        pass_s=t, steps_per_s=steps_per_pass / t, instances_per_s=n_inst / t,
        mem_mb=max(0, peak - rss0) / 1024, peak_rss_mb=peak / 1024, exact_peak=exact_peak,
        loss_finite=all(math.isfinite(v) for v in losses), params=num_params(model),
        repr=repr(model).replace("\n", " ")[:400],
    )


def run_isolated(cfg: dict, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                          capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(proc.stderr[-2000:])


_TMPDIR: Optional[str] = None


def run_safe(cfg: dict, isolate: bool, timeout: float) -> dict:
    global _TMPDIR
    try:
        if isolate:
            import hashlib
            import tempfile

            if _TMPDIR is None:
                _TMPDIR = tempfile.mkdtemp(prefix="graphmil-bench-")
            key = hashlib.sha1(json.dumps(cfg["mix"], sort_keys=True).encode()).hexdigest()[:12]
            cfg = dict(cfg, bags_file=os.path.join(_TMPDIR, f"bags-{key}.pt"))
            cached_bags(cfg["mix"], cfg["bags_file"])  # generate once, in the parent
            _BAGS.clear()  # the parent does not need to keep them
        return run_isolated(cfg, timeout) if isolate else run_config(cfg)
    except Exception as e:  # report the failure in the table instead of aborting the run
        err = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        return dict(framework=cfg["framework"], model=cfg["model"], mode=cfg["mode"], error=err[:200])


# --------------------------------------------------------------------------- reporting
def machine() -> List[str]:
    import torch_geometric

    try:
        import torchmil
        tm = getattr(torchmil, "__version__", None)
        if tm is None:
            from importlib.metadata import version
            tm = version("torchmil")
    except Exception:  # pragma: no cover
        tm = "not installed"
    import graphmil

    return [
        f"- machine: `{platform.platform()}`, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, `torch.set_num_threads({torch.get_num_threads()})`",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"torch_geometric {torch_geometric.__version__}, torchmil {tm}, graphmil {graphmil.__version__}",
    ]


def fmt(v, digits=3):
    if v is None:
        return "—"
    if isinstance(v, float):
        if v >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def table(results: List[dict]) -> List[str]:
    rows = ["| model | way | bags | instances | time / pass (s) | optimizer steps/s | instances/s | "
            "step memory (MB) | parameters | finite loss | graphmil speed-up |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["framework"], r["mode"]): r for r in results}
    for r in results:
        label = {"batched": "graphmil (batched)", "padded": "torchmil (padded batch)",
                 "loop": "graphmil, batch-size-1 loop"}[r["mode"]]
        if "error" in r:
            rows.append(f"| {r['model']} | {label} | — | — | failed: {r['error']} | | | | | | |")
            continue
        g = by.get((r["model"], "graphmil", "batched"))
        ratio = "—"
        if r["mode"] != "batched" and g and "error" not in g:
            ratio = f"**{r['pass_s'] / g['pass_s']:.2f}×**"
        rows.append(
            f"| {r['model']} | {label} | {r['bags']} | {r['instances']:,} | {fmt(r['pass_s'])} | "
            f"{fmt(r['steps_per_s'])} | {fmt(r['instances_per_s'])} | {fmt(r['mem_mb'])} | "
            f"{r['params']:,} | {'yes' if r['loss_finite'] else '**no (NaN)**'} | {ratio} |")
    return rows


def write_markdown(path: str, title: str, intro: List[str], body: List[str], command: str) -> None:
    lines = [f"# {title}", ""] + intro + ["", f"Command: `{command}`", ""] + machine() + [""] + body
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


def update_section(path: str, key: str, lines: List[str]) -> None:
    """Replace the text between ``<!-- key:begin -->`` and ``<!-- key:end -->`` in ``path``."""
    with open(path) as f:
        text = f.read()
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    if begin not in text or end not in text:
        return
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(head + begin + "\n" + "\n".join(lines).replace("](../", "](") + "\n" + end + tail)


# --------------------------------------------------------------------------- main modes
def throughput(args) -> None:
    mix = dict(MIX["quick" if args.quick else "full"])
    mix_tf = dict(MIX["quick_small" if args.quick else "full_small"])
    for key, val in (("num_bags", args.bags), ("min_instances", args.min_instances),
                     ("max_instances", args.max_instances), ("D", args.dim), ("seed", args.seed)):
        if val is not None:
            mix[key] = val
            if key in ("D", "seed"):
                mix_tf[key] = val
    equivalence = []
    if not args.no_torchmil:
        try:
            equivalence = check_equivalence()
        except Exception as e:  # pragma: no cover - report, do not abort
            equivalence = [f"- equivalence check failed: {type(e).__name__}: {e}"]
        print("\n".join(equivalence))
    configs = []
    for name in args.models:
        m = mix_tf if name in SMALL_MIX_MODELS else mix
        base = dict(model=name, mix=m, threads=args.threads, warmup=args.warmup, steps=args.steps)
        configs.append(dict(base, framework="graphmil", mode="batched"))
        if name in TORCHMIL and not args.no_torchmil:
            configs.append(dict(base, framework="torchmil", mode="padded"))
        if not args.no_loop:
            configs.append(dict(base, framework="graphmil", mode="loop"))
    if configs and not args.isolate:
        run_safe(configs[0], False, args.timeout)  # warm the process up (threads, allocator); discarded
    results = []
    for cfg in configs:
        r = run_safe(cfg, args.isolate, args.timeout)
        results.append(r)
        if "error" in r:
            print(f"{r['model']:6s} {r['framework']:8s} {r['mode']:7s} FAILED {r['error']}", flush=True)
        else:
            print(f"{r['model']:6s} {r['framework']:8s} {r['mode']:7s} {r['instances']:8d} inst  "
                  f"{r['pass_s']:8.3f} s/pass  {r['instances_per_s']:10.0f} inst/s  "
                  f"{r['mem_mb']:8.1f} MB  finite={r['loss_finite']}", flush=True)
    rows = table(results)
    print("\n".join(rows))
    print()
    ratios = []
    by = {(r["model"], r["framework"], r["mode"]): r for r in results if "error" not in r}
    for name in args.models:
        g = by.get((name, "graphmil", "batched"))
        if not g:
            continue
        for fw, mode, label in (("torchmil", "padded", "torchmil"), ("graphmil", "loop", "batch-size-1 loop")):
            o = by.get((name, fw, mode))
            if o:
                line = (f"- **{name}**: graphmil batched vs {label}: speed-up **{o['pass_s'] / g['pass_s']:.2f}×** "
                        f"({g['pass_s']:.3g} s vs {o['pass_s']:.3g} s per pass; step memory "
                        f"{g['mem_mb']:.0f} MB vs {o['mem_mb']:.0f} MB)")
                ratios.append(line)
                print(line)
    if args.no_write:
        return
    d = mix
    intro = ([
        "> **Quick smoke run** (`--quick`): tiny bags, one timed pass; the numbers check that every "
        "configuration runs, they are not a measurement. Run the full mode on an idle machine for "
        "the real table.", ""] if args.quick else []) + [
        "Training throughput of graphmil's registered models on one batch of bags, side by side with "
        "torchmil's equivalents on its padded batches and with a batch-size-1 loop over the same bags "
        "(written by `benchmarks/train_throughput.py`; see [the benchmarks index](../benchmarks.md) for "
        "what is measured and how).",
        "",
        f"- data: `SyntheticBags(num_bags={d['num_bags']}, num_features={d['D']}, "
        f"min_instances={d['min_instances']}, max_instances={d['max_instances']}, "
        f"size_distribution='loguniform', seed={d['seed']})`, 8-neighbour grid edges"
        + ("" if not set(SMALL_MIX_MODELS) & set(args.models) else
           f"; {' and '.join(m for m in SMALL_MIX_MODELS if m in args.models)} (bag-local "
           f"self-attention) on the smaller mix `num_bags={mix_tf['num_bags']}, "
           f"min_instances={mix_tf['min_instances']}, max_instances={mix_tf['max_instances']}` "
           "for every way they are compared"),
        f"- hyperparameters: embedding {EMBED}, attention {ATT}, gated ABMIL; Sm T = {SM_STEPS}, "
        f"learnable α initialised at {SM_ALPHA}, early placement, spectral norm after Sm; transformer "
        f"{TF_LAYERS} layers × {TF_HEADS} heads × width {EMBED}, pre-LN, no MLP; Adam lr 1e-4",
        f"- timing: best of {args.steps} timed pass(es) after {args.warmup} warm-up pass(es); one pass = one "
        "optimizer step on the whole batch (graphmil, torchmil) or one step per bag (loop)",
        "- allocator: " + ("tuned glibc malloc (`--tuned-malloc`: "
                          + ", ".join(f"`{k}={v}`" for k, v in TUNED_MALLOC.items()) + ")"
                          if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "default glibc malloc"),
        "- step memory: peak RSS during the timed passes minus RSS before them "
        f"({'one fresh subprocess per row' if args.isolate else 'all rows in one process'})",
    ]
    body = rows + ["", "Ratios (time per pass of the other way / graphmil batched):", ""] + ratios
    if equivalence:
        body += ["", "Same function on both sides (checked in the same run on 3 small bags):", ""] + equivalence
    write_markdown(args.out, "Training throughput", intro, body, args.command)
    print(f"\nwrote {args.out}")
    if args.index and os.path.exists(args.index):
        summary = ([f"From `{args.command}` ({'quick smoke run, not a measurement' if args.quick else 'full run'}); "
                    f"details in [train_throughput](benchmarks/train_throughput.md).", ""]
                   + machine() + [""] + rows + [""] + ratios)
        update_section(args.index, "train_throughput", summary)
        print(f"updated {args.index}")


def write_trident_folder(root: str, bags) -> str:
    """Write ``bags`` as a TRIDENT feature folder (20x, 256 px patches, no overlap) under ``root``;
    return the labels table. Coordinates are the bags' level-0 ``pos`` (256 px grid step)."""
    import csv

    import h5py
    import numpy as np

    job = os.path.join(root, "20x_256px_0px_overlap")
    pdir, fdir = os.path.join(job, "patches"), os.path.join(job, "features_uni_v1")
    os.makedirs(pdir, exist_ok=True)
    os.makedirs(fdir, exist_ok=True)
    rows = []
    for i, b in enumerate(bags):
        sid = f"slide_{i:03d}"
        coords = b.pos.numpy().astype(np.int64)
        attrs = dict(patch_size=256, patch_size_level0=256, level0_magnification=20,
                     target_magnification=20, overlap=0, name=sid,
                     level0_width=int(coords[:, 0].max()) + 1256, level0_height=int(coords[:, 1].max()) + 1256)
        with h5py.File(os.path.join(pdir, f"{sid}_patches.h5"), "w") as f:
            f.create_dataset("coords", data=coords).attrs.update(attrs)
        with h5py.File(os.path.join(fdir, f"{sid}.h5"), "w") as f:
            f.create_dataset("features", data=b.x.numpy())
            f.create_dataset("coords", data=coords).attrs.update(attrs)
        rows.append([f"case_{i:03d}", sid, int(b.y.view(-1)[0]), "train"])
    labels = os.path.join(root, "labels.tsv")
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["case_id", "slide_id", "label", "fold_0"])
        w.writerows(rows)
    return labels


def loading_share(args, name: str, D: int) -> List[str]:
    """Share of an epoch spent reading bags and building graphs, on a FeatureBagDataset folder.

    Writes the benchmark's bags as a TRIDENT folder, then times (1) the first pass of
    ``FeatureBagDataset`` (read every slide, build its 8-neighbour graph, write the cache), (2) the
    graph build alone (``GridGraph`` on the same bags, in memory), (3) one epoch of loading from the
    cache with PyG's ``DataLoader`` (one batch of all bags) and (4) the training step on that batch.
    """
    import shutil
    import tempfile

    from torch_geometric.loader import DataLoader

    from graphmil.datasets import FeatureBagDataset
    from graphmil.transforms import GridGraph

    mix = dict(MIX["quick" if args.quick else "full"], D=D)
    bags = make_bags(mix["num_bags"], mix["min_instances"], mix["max_instances"], D, mix["seed"])
    n_inst = sum(b.num_nodes for b in bags)
    tmp = tempfile.mkdtemp(prefix="graphmil-bench-")
    try:
        labels = write_trident_folder(os.path.join(tmp, "slides"), bags)
        t0 = time.perf_counter()
        ds = FeatureBagDataset(os.path.join(tmp, "slides"), labels, cache_dir=os.path.join(tmp, "cache"), log=False)
        t_process = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in bags:
            GridGraph(connectivity=8)(b.clone())
        t_graph = time.perf_counter() - t0
        loader = DataLoader(ds, batch_size=len(ds), shuffle=False)
        t0 = time.perf_counter()
        batch = next(iter(loader))
        t_load = time.perf_counter() - t0
        model = graphmil_model(name, D)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        steps = []
        for _ in range(2):
            t0 = time.perf_counter()
            train_step(model, batch, opt)
            steps.append(time.perf_counter() - t0)
        t_step = min(steps[1:])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    epoch = t_load + t_step
    first = t_process + t_load + t_step
    return [
        f"One epoch = one batch of the {len(bags)} bags ({n_inst:,} instances, D = {D}) of a TRIDENT "
        f"folder read by `FeatureBagDataset`, model `{name}`:",
        "",
        "| part | time (s) | share of the epoch |",
        "|---|---|---|",
        f"| loading the bags from the cache (`DataLoader`, one batch) | {t_load:.3f} | {100 * t_load / epoch:.1f} % |",
        f"| training step (forward, loss, backward, Adam) | {t_step:.3f} | {100 * t_step / epoch:.1f} % |",
        f"| first epoch only: reading the slides + building graphs + caching | {t_process:.3f} | "
        f"{100 * t_process / first:.1f} % of the first epoch |",
        f"| of which building the 8-neighbour graphs (`GridGraph`) | {t_graph:.3f} | "
        f"{100 * t_graph / first:.1f} % of the first epoch |",
    ]



def scaling(args) -> None:
    """Step time and memory against total instances and bag count, and the loading share."""
    name = args.scaling_model
    D = 128 if args.quick else 512
    sizes = [2_000, 5_000, 10_000, 20_000] if args.quick else [10_000, 30_000, 100_000, 300_000, 1_000_000]
    counts = [1, 4, 16, 64] if args.quick else [1, 4, 16, 64, 256]
    fixed_total = 10_000 if args.quick else 100_000
    budget = 35.0 if args.quick else 300.0
    t_start = time.perf_counter()
    results = []

    def run(total, nb, kind):
        mix = dict(num_bags=nb, min_instances=1, max_instances=1, D=D, seed=0, total=total)
        cfg = dict(framework="graphmil", model=name, mode="batched", mix=mix, threads=args.threads,
                   warmup=1, steps=1)
        r = run_safe(cfg, args.isolate, args.timeout)
        _BAGS.clear()
        r["kind"] = kind
        results.append(r)
        if "error" in r:
            print(f"{kind:6s} bags={nb:4d} total={total:8d} FAILED {r['error']}", flush=True)
        else:
            print(f"{kind:6s} bags={nb:4d} inst={r['instances']:8d} {r['pass_s']:8.3f} s/step "
                  f"{r['instances_per_s']:10.0f} inst/s {r['mem_mb']:8.1f} MB", flush=True)
        return r

    per_inst = mem_per_inst = None
    for total in sizes:
        elapsed = time.perf_counter() - t_start
        # a configuration costs ~ (1 warm-up + 1 timed) steps + setup, linear in the size
        if per_inst is not None and elapsed + 3.5 * per_inst * total > budget * 0.6:
            print(f"skip total={total}: predicted {3.5 * per_inst * total:.0f} s exceeds the time budget")
            continue
        if mem_per_inst is not None and mem_per_inst * total > 0.7 * _available_mb():
            print(f"skip total={total}: predicted {mem_per_inst * total / 1024:.1f} GB exceeds the free memory")
            continue
        r = run(total, 16, "size")
        if "error" not in r:
            per_inst = r["pass_s"] / r["instances"]
            mem_per_inst = (r["mem_mb"] + r["instances"] * D * 4 / 2**20) / r["instances"]
    for nb in counts:
        elapsed = time.perf_counter() - t_start
        if per_inst is not None and elapsed + 3.5 * per_inst * fixed_total > budget:
            print(f"skip bags={nb}: over the time budget")
            continue
        run(fixed_total, nb, "bags")
    try:
        loading = loading_share(args, name, D)
    except Exception as e:  # report, do not abort the sweep
        loading = [f"Loading share not measured: {type(e).__name__}: {e}"]
    print("\n".join(loading))
    rows = ["| sweep | bags | instances | step time (s) | µs / instance | instances/s | step memory (MB) | "
            "memory / instance (KB) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['kind']} | — | — | failed: {r['error']} | | | | |")
            continue
        rows.append(f"| {'total instances' if r['kind'] == 'size' else 'bag count'} | {r['bags']} | "
                    f"{r['instances']:,} | {fmt(r['pass_s'])} | {1e6 * r['pass_s'] / r['instances']:.1f} | "
                    f"{fmt(r['instances_per_s'])} | {fmt(r['mem_mb'])} | "
                    f"{1024 * r['mem_mb'] / r['instances']:.2f} |")
    print("\n".join(rows))
    if args.no_write:
        return
    intro = ([
        "> **Quick smoke run** (`--quick`): small sizes, one timed step; not a measurement.", ""]
        if args.quick else []) + [
        f"Step time and memory of graphmil's `{name}` (one optimizer step on one batch) against the "
        f"total number of instances (16 bags) and against the number of bags at a fixed total of "
        f"{fixed_total:,} instances, D = {D}. Linear cost shows as a constant µs / instance and "
        "memory / instance. Sizes whose predicted time would exceed the script's budget are skipped.",
        "",
        "- allocator: " + ("tuned glibc malloc (`--tuned-malloc`)" if os.environ.get("MALLOC_MMAP_THRESHOLD_")
                          else "default glibc malloc"),
    ]
    body = rows + ["", "## Data loading and graph building share of an epoch", ""] + loading
    write_markdown(args.scaling_out, "Training throughput: scaling", intro, body, args.command)
    print(f"\nwrote {args.scaling_out}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small mix (4 bags, 300-3,000 instances, D = 128; SmTAP/AINet 3 bags <= 600): a < 1 min smoke test")
    p.add_argument("--scaling", action="store_true", help="step time / memory vs size and bag count")
    p.add_argument("--scaling-model", default="smap")
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--bags", type=int, default=None, help="override the number of bags of the mix")
    p.add_argument("--min-instances", type=int, default=None, help="override the smallest bag")
    p.add_argument("--max-instances", type=int, default=None, help="override the largest bag")
    p.add_argument("--dim", type=int, default=None, help="override the feature width D")
    p.add_argument("--seed", type=int, default=None, help="override the data seed")
    p.add_argument("--steps", type=int, default=None, help="timed passes, the best is reported (default 1; use 3 on a machine with time to spare)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-torchmil", action="store_true")
    p.add_argument("--no-loop", action="store_true")
    iso = p.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                     help="one fresh subprocess per configuration (default in the full run)")
    iso.add_argument("--no-isolate", dest="isolate", action="store_false")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per isolated configuration")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks", "train_throughput.md"))
    p.add_argument("--index", default=os.path.join(ROOT, "docs", "benchmarks.md"),
                   help="page whose 'train_throughput' section gets the summary table")
    p.add_argument("--scaling-out", default=os.path.join(ROOT, "docs", "benchmarks", "train_scaling.md"))
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--tuned-malloc", action="store_true",
                   help="re-run under glibc settings that keep large tensors on the heap "
                        f"({' '.join(f'{k}={v}' for k, v in TUNED_MALLOC.items())}), for every way alike")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tuned_malloc and not args.worker and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = dict(os.environ, **TUNED_MALLOC)
        argv_ = sys.argv if argv is None else [sys.argv[0]] + list(argv)
        os.execve(sys.executable, [sys.executable] + argv_, env)
    torch.set_num_threads(args.threads)
    if args.worker:
        print("RESULT " + json.dumps(run_config(json.loads(args.worker))), flush=True)
        return
    if args.steps is None:
        args.steps = 1
    if args.isolate is None:
        args.isolate = not args.quick
    args.command = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    try:
        if args.scaling:
            scaling(args)
        else:
            throughput(args)
    finally:
        if _TMPDIR is not None:
            import shutil

            shutil.rmtree(_TMPDIR, ignore_errors=True)
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
