"""Regenerate the API reference pages ``docs/api/*.md`` from the modules of the package.

Run from the repository root after adding a module: ``python docs/gen_api.py``.  Every public
module (no leading underscore in any part of its dotted name) gets a ``::: module`` block on the
page of its package; ``tests/test_docs.py`` fails when a module is missing from the reference.
Package ``__init__`` files are lazy namespaces that re-export their submodules' ``__all__``, so the
reference documents the concrete submodules (the names are importable from the package too).
"""

from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "graphmil"
API = ROOT / "docs" / "api"

# (page, title, module prefix(es), intro, modules listed first in this order)
PAGES = [
    ("data", "graphmil.data", ["graphmil.data."],
     "The bag data model (`make_bag`, `validate_bag`) and splits. See the "
     "[data model guide](../data.md).", ["graphmil.data.bag"]),
    ("utils", "graphmil.utils", ["graphmil.utils"],
     "Segment operations over the batch index: the vocabulary every graphmil layer is written in.", []),
    ("ops", "graphmil.ops", ["graphmil.ops."],
     "The floor under `graphmil.nn` and `graphmil.transforms`: geometry (grid step, lattice / k-NN / "
     "radius edges, per bag), region partitions, instance masks, batch bookkeeping.",
     ["graphmil.ops.geometry", "graphmil.ops.partition", "graphmil.ops.masking"]),
    ("io", "graphmil.io", ["graphmil.io."],
     "Readers and writers for CLAM, TRIDENT and graphmil's own bag files; score export.", []),
    ("transforms", "graphmil.transforms", ["graphmil.transforms."],
     "PyG transforms: spatial graphs, edge weights, region partitions, subsampling.", []),
    ("datasets", "graphmil.datasets", ["graphmil.datasets."],
     "Datasets: feature folders, synthetic spatial bags, classic MIL sets, colon-cancer bags. See "
     "the [datasets guide](../datasets.md).", []),
    ("nn-aggr", "graphmil.nn.aggr", ["graphmil.nn.aggr."],
     "Attention pools as PyG aggregations. Every pool subclasses `AttentionPool` and returns a "
     "`PoolOutput` from `attend`; see the tutorial "
     "[Write your own pool](../tutorials/write-your-own-pool.md).",
     ["graphmil.nn.aggr.base", "graphmil.nn.aggr.attention"]),
    ("nn-conv", "graphmil.nn.conv", ["graphmil.nn.conv."],
     "Message-passing layers: the Sm smooth operator. See [Sm](../methods/sm.md).", []),
    ("nn", "graphmil.nn", ["graphmil.nn."],
     "Other layers: bag-local transformers, anchors (DAM, ARC), CASii keys, masking.", []),
    ("losses", "graphmil.losses", ["graphmil.losses."],
     "Loss modules: AEM, ACMIL diversity, CASii instance losses, AINet terms.", []),
    ("models", "graphmil.models", ["graphmil.models."],
     "The model registry (`create_model`, `list_models`, `register_model`), the base class "
     "`MILModel`, the typed output `MILOutput`, and every registered model.",
     ["graphmil.models.registry", "graphmil.models.base", "graphmil.models.output"]),
    ("metrics", "graphmil.metrics", ["graphmil.metrics."], "Bag and instance metrics.", []),
    ("train", "graphmil.train", ["graphmil.train."],
     "Training engine: `train_step` (the one step), `fit`, `predict` / `evaluate` (one record per "
     "bag), patient-grouped `cross_validate` with `splits.csv` and `predictions.csv`, resume, "
     "`evaluate_run`, checkpoints, and the checks made before anything is written. See "
     "[Training](../training.md).",
     ["graphmil.train.step", "graphmil.train.loop", "graphmil.train.inference", "graphmil.train.cv",
      "graphmil.train.runs", "graphmil.train.data", "graphmil.train.checkpoint", "graphmil.train.config"]),
    ("viz", "graphmil.viz", ["graphmil.viz."], "Attention heatmaps.", []),
    ("cli", "graphmil.cli", ["graphmil.cli", "graphmil."],
     "The `graphmil` command. See [Command line and config](../cli.md).", []),
]


def public_modules() -> list[str]:
    """Dotted names of every public, non-package module under ``graphmil/``."""
    mods = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" or any(p.startswith("_") for p in parts):
            continue
        mods.append(".".join(parts))
    return mods


def assign(mods: list[str]) -> dict[str, list[str]]:
    """Page of each module: the page whose prefix matches it most specifically."""
    pages: dict[str, list[str]] = {p[0]: [] for p in PAGES}
    for mod in mods:
        best, best_len = None, -1
        for name, _, prefixes, _, _ in PAGES:
            for pre in prefixes:
                if (mod == pre or mod.startswith(pre)) and len(pre) > best_len:
                    best, best_len = name, len(pre)
        pages[best].append(mod)
    for name, _, _, _, first in PAGES:
        found = pages[name]
        pages[name] = [m for m in first if m in found] + [m for m in found if m not in first]
    return pages


def main() -> None:
    pages = assign(public_modules())
    API.mkdir(parents=True, exist_ok=True)
    index = ["# API reference", "",
             "Generated from the docstrings (`python docs/gen_api.py` refreshes these pages). "
             "Package namespaces are lazy: every public name of a submodule is also importable "
             "from its package, e.g. `from graphmil.nn.aggr import AttentionAggregation`.", "",
             "| Package | Modules |", "|---|---|"]
    for name, title, _, intro, _ in PAGES:
        mods = pages[name]
        lines = [f"# {title}", "", intro, ""]
        if not mods:
            lines.append("_No public module yet._")
        for mod in mods:
            lines += [f"::: {mod}", ""]
        (API / f"{name}.md").write_text("\n".join(lines).rstrip() + "\n")
        listed = ", ".join(f"`{m}`" for m in mods) or "—"
        index.append(f"| [{title}]({name}.md) | {listed} |")
    (API / "index.md").write_text("\n".join(index) + "\n")


if __name__ == "__main__":
    main()
