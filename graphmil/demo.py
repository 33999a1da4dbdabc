"""``graphmil demo``: train the main methods on synthetic spatial bags, print a table, draw heatmaps.

No download, no argument needed: :class:`graphmil.datasets.SyntheticBags` generates bags of grid
patches with contiguous "tumour" blobs (instance labels known), split into train / validation /
test; ABMIL, ABMIL+AEM, SmAP, CASii and AINet are trained with the same engine
(:func:`graphmil.train.fit`) and evaluated on the test bags (bag AUROC, accuracy, instance
AUROC); one heatmap per model of the same positive test bag is written into a new run directory.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["DEMO_MODELS", "DemoSpec", "run_demo", "demo_dataset", "format_table"]


@dataclass
class DemoSpec:
    """One row of the demo: a display ``label``, a registered model ``name``, its ``kwargs`` and
    the AEM weight ``aem_lambda``."""

    label: str
    name: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    aem_lambda: float = 0.0
    lr: float = 2e-3


#: the methods the demo trains (small widths: fast on 2 CPU cores; learning rates tuned on the demo data)
DEMO_MODELS: List[DemoSpec] = [
    DemoSpec("ABMIL", "abmil", {"embed_dim": 64, "attention_dim": 32}),
    DemoSpec("ABMIL+AEM", "abmil", {"embed_dim": 64, "attention_dim": 32}, aem_lambda=0.1),
    DemoSpec("SmAP", "smap", {"embed_dim": 64, "hidden_channels": 32}),
    DemoSpec("CASii", "casii", {"hidden_channels": 64}, lr=5e-4),
    DemoSpec("AINet", "ainet", {"embed_dim": 32, "attention_dim": 32, "heads": 4}),
]


def demo_dataset(quick: bool = False, seed: int = 0):
    """The demo's bags: ``(train, val, test, dataset)`` of :class:`SyntheticBags` (``signal=2.0``,
    32 features, 40–160 instances per bag, 160 bags), split 60/15/25 % stratified by bag label
    and grouped by case (:func:`graphmil.data.holdout_split`; each synthetic bag is its own
    case). ``quick`` changes only the number of epochs, not the bags."""
    from graphmil.data.splits import holdout_split
    from graphmil.datasets import SyntheticBags
    from graphmil.train.data import dataset_meta, subset

    n = 160
    ds = SyntheticBags(num_bags=n, num_features=32, seed=seed, min_instances=40, max_instances=160,
                       signal=2.0)
    meta = dataset_meta(ds)
    groups = np.asarray(meta.case_ids)
    rest, test = holdout_split(meta.labels, 0.25, seed, groups)
    rest = np.asarray(rest)
    a, b = holdout_split(meta.labels[rest], 0.2, seed, groups[rest])
    train, val = rest[a], rest[b]
    return subset(ds, train), subset(ds, val), subset(ds, test), ds


def _filter_kwargs(name: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    # keep only the keyword arguments the registered model accepts (the demo's sizes are hints)
    from graphmil.models.registry import model_parameters

    accepted = model_parameters(name)
    return {k: v for k, v in kwargs.items() if k in accepted}


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """A fixed-width text table of the demo rows."""
    head = f"{'model':<12} {'bag AUROC':>9} {'bag acc':>8} {'inst AUROC':>10} {'epochs':>6} {'time (s)':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['model']:<12} failed: {r['error']}")
            continue
        lines.append(f"{r['model']:<12} {r['auroc']:>9.3f} {r['accuracy']:>8.3f} "
                     f"{r.get('instance_auroc', float('nan')):>10.3f} {r['epochs']:>6d} {r['time_s']:>8.1f}")
    return "\n".join(lines)


def run_demo(out: Optional[str] = None, quick: bool = False, seed: int = 0,
             models: Optional[Sequence[str]] = None, epochs: Optional[int] = None,
             progress: bool = True, root: str = "runs", echo=print) -> Dict[str, Any]:
    """Run the demo and return ``{"rows": [...], "run_dir": path, "heatmaps": {...}}``.

    Args:
        out (str, optional): the run directory to create (must not exist); default: a new
            ``runs/demo``, ``runs/demo-1``, ...
        quick (bool): half the epochs (default ``False``).
        seed (int): seed of the data and the training (default ``0``).
        models (list of str, optional): labels of :data:`DEMO_MODELS` to run (default: all).
        epochs (int, optional): override the number of epochs (default 20, 10 with ``quick``).
        progress (bool): progress bars (default ``True``).
        root (str): parent of the default run directory (default ``"runs"``).
        echo: where lines are printed (default ``print``).
    """
    import torch

    from graphmil.metrics.bag import ignore_undefined_metrics
    from graphmil.models import create_model, list_models
    from graphmil.train.config import TrainConfig
    from graphmil.train.inference import evaluate
    from graphmil.train.loop import fit, seed_everything
    from graphmil.train.runs import make_run_dir
    from graphmil.viz.heatmap import heatmap_of_prediction

    specs = DEMO_MODELS
    if models:
        wanted = [m.lower() for m in models]
        known = [s.label.lower() for s in DEMO_MODELS]
        bad = [m for m in wanted if m not in known]
        if bad:
            raise ValueError(f"demo: unknown model(s) {bad}; the demo runs {', '.join(s.label for s in DEMO_MODELS)}")
        specs = [s for s in DEMO_MODELS if s.label.lower() in wanted]
    if out is not None and os.path.exists(out):
        raise ValueError(f"run directory '{out}' already exists; choose a new one "
                         "(graphmil never overwrites a run)")
    train, val, test, ds = demo_dataset(quick, seed)
    run_dir = make_run_dir(out, root=root, name="demo")
    n_ep = epochs or (10 if quick else 20)
    echo(f"graphmil demo: {len(train)} train / {len(val)} val / {len(test)} test synthetic bags "
         f"({ds.num_features} features, {ds.min_instances}-{ds.max_instances} instances), "
         f"{n_ep} epochs per model, {torch.get_num_threads()} thread(s)")
    # the largest positive test bag, drawn for every model
    pos_bags = [i for i in range(len(test)) if int(test[i].y.view(-1)[0]) == 1]
    show = max(pos_bags, key=lambda i: int(test[i].num_nodes)) if pos_bags else 0
    rows: List[Dict[str, Any]] = []
    heatmaps: Dict[str, str] = {}
    available = set(list_models())
    for spec in specs:
        if spec.name not in available:
            rows.append({"model": spec.label, "error": f"model '{spec.name}' is not available"})
            continue
        seed_everything(seed)
        model = create_model(spec.name, ds.num_features, 1, **_filter_kwargs(spec.name, spec.kwargs))
        cfg = TrainConfig(epochs=n_ep, batch_size=8, lr=spec.lr, weight_decay=1e-4,
                          optimizer="adamw", scheduler="cosine", aem_lambda=spec.aem_lambda,
                          monitor="auroc", seed=seed, device="cpu", progress=progress)
        t0 = time.perf_counter()
        res = fit(model, train, val, cfg)
        elapsed = time.perf_counter() - t0
        with ignore_undefined_metrics():
            ev = evaluate(res.model, test)
        row = {"model": spec.label, "name": spec.name, "auroc": ev["auroc"], "accuracy": ev["accuracy"],
               "f1": ev["f1"], "instance_auroc": ev.get("instance_auroc", float("nan")),
               "instance_auroc_sm": ev.get("instance_auroc_sm", float("nan")),
               "epochs": res.epochs_run, "best_epoch": res.best_epoch, "time_s": elapsed,
               "aem_lambda": spec.aem_lambda, "kwargs": json.dumps(_filter_kwargs(spec.name, spec.kwargs))}
        rows.append(row)
        rec = ev.predictions[show]
        if rec.instance_scores is not None:
            path = os.path.join(run_dir, "heatmaps", f"{spec.label.replace('+', '_')}.png")
            heatmap_of_prediction(rec, path, class_names=["normal", "tumour"],
                                  patch_size=getattr(ds, "patch_size", None), outline_labels=True,
                                  title_prefix=f"{spec.label}: test bag", note="outlined = tumour")
            heatmaps[spec.label] = path
        echo(f"  {spec.label:<10} bag AUROC {row['auroc']:.3f}  instance AUROC "
             f"{row['instance_auroc']:.3f}  ({elapsed:.1f} s)")
    ok = [r for r in rows if not r.get("error")]
    if ok:
        keys = [k for k in ok[0]]
        with open(os.path.join(run_dir, "results.csv"), "x", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in ok:
                w.writerow({k: r.get(k) for k in keys})
    with open(os.path.join(run_dir, "results.json"), "x") as f:
        json.dump({"rows": rows, "seed": seed, "quick": quick, "epochs": n_ep,
                   "heatmap_bag": test[show].slide_id, "heatmaps": heatmaps}, f, indent=2)
    return {"rows": rows, "run_dir": run_dir, "heatmaps": heatmaps}
