"""The accuracy benchmarks (MUSK1/MUSK2, colon cancer): their fold-parallel trainer is the graphmil
model and torch's Adam fold by fold, and both ``--quick`` runs write a table of finite numbers."""

from __future__ import annotations

import copy
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = os.environ.get("GRAPHMIL_DATA") or str(ROOT.parent / "shared" / "data")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def classic():
    return _load("classic_mil")


def _padded(bags):
    n = max(b.size(0) for b in bags)
    X = torch.zeros(len(bags), n, bags[0].size(1))
    mask = torch.zeros(len(bags), n, dtype=torch.bool)
    for j, b in enumerate(bags):
        X[j, :b.size(0)] = b
        mask[j, :b.size(0)] = True
    return X, mask


@pytest.mark.parametrize("gated", [False, True])
def test_stacked_forward_is_graphmils_abmil(classic, gated):
    from torch_geometric.data import Batch, Data

    torch.manual_seed(0)
    models = [classic.paper_abmil(12, gated).eval() for _ in range(3)]
    S = classic.Stacked(models)
    bags = [torch.randn(n, 12) for n in (5, 1, 9)]
    X, mask = _padded(bags)
    out = S.forward(S.params, X, mask, train=False)
    ref = torch.cat([m(Batch.from_data_list([Data(x=b)])).bag_logits.view(-1) for m, b in zip(models, bags)])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # rows of the stack (a chunk of folds) give the same folds' outputs
    sub = {k: v[torch.tensor([2, 0])] for k, v in S.params.items()}
    X2, mask2 = _padded([bags[2], bags[0]])
    torch.testing.assert_close(S.forward(sub, X2, mask2, train=False), ref[[2, 0]], rtol=1e-5, atol=1e-6)
    # weights round-trip into a fresh graphmil model
    fresh = classic.paper_abmil(12, gated).eval()
    S.unstack_into(1, fresh)
    torch.testing.assert_close(fresh(Batch.from_data_list([Data(x=bags[1])])).bag_logits.view(-1), ref[1:2])


def test_stacked_adam_is_torch_adam_per_fold(classic):
    """Two steps of the stacked optimizer == torch.optim.Adam on each fold's own model; a fold left
    out of a step keeps its weights (and its moments) unchanged."""
    from torch_geometric.data import Batch, Data

    torch.manual_seed(1)
    models = [classic.paper_abmil(6, True) for _ in range(3)]
    refs = [copy.deepcopy(m).eval() for m in models]
    S = classic.Stacked(models)
    opt = classic.StackedAdam(S.params.values(), lr=1e-2, weight_decay=0.01)
    ref_opts = [torch.optim.Adam(r.parameters(), lr=1e-2, weight_decay=0.01) for r in refs]
    bags = [torch.randn(n, 6) for n in (4, 7, 2)]
    y = torch.tensor([1.0, 0.0, 1.0])
    X, mask = _padded(bags)
    for active in (torch.tensor([True, True, True]), torch.tensor([True, False, True])):
        logit = S.forward(S.params, X, mask, train=False)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="none")
        (loss * active.float()).sum().backward()
        opt.step(active)
        for f in range(3):
            if not active[f]:
                continue
            lf = refs[f](Batch.from_data_list([Data(x=bags[f])])).bag_logits.view(-1)
            ref_opts[f].zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(lf, y[f:f + 1]).backward()
            ref_opts[f].step()
    for f in range(3):
        got = classic.paper_abmil(6, True).eval()
        S.unstack_into(f, got)
        for (n, a), b in zip(got.named_parameters(), refs[f].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"fold {f} {n}")


_NUM = re.compile(r"(-?\d+\.\d+) ± (-?\d+\.\d+)")


def _run(script, out, *extra):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--data", DATA,
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=300,
                          cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "±" in line]
    return text, rows


@pytest.mark.skipif(not os.path.isfile(os.path.join(DATA, "musk1", "musk1.npz")), reason="shared data absent")
def test_classic_mil_quick(tmp_path):
    text, rows = _run("classic_mil.py", tmp_path / "classic_mil.md")
    assert len(rows) == 4 and "--quick" in text and "Ilse" in text
    for row in rows:
        ours, published = [tuple(map(float, m)) for m in _NUM.findall(row)][:2]
        assert all(np.isfinite(ours)) and 0.0 <= ours[0] <= 1.0 and published[0] > 0.85


@pytest.mark.skipif(not os.path.isfile(os.path.join(DATA, "colon_cancer", "bags_27px.npz")),
                    reason="shared data absent")
def test_colon_cancer_quick(tmp_path):
    text, rows = _run("colon_cancer.py", tmp_path / "colon_cancer.md")
    assert len(rows) == 6
    for row in rows:
        vals = [tuple(map(float, m)) for m in _NUM.findall(row)]
        assert len(vals) == 3 and all(np.isfinite(v).all() for v in vals), row
        assert all(0.0 <= v[0] <= 1.0 for v in vals)
    pngs = sorted((tmp_path / "img").glob("colon_*.png"))
    assert len(pngs) == 6 and all(0 < p.stat().st_size < 200_000 for p in pngs)
    for p in pngs:
        assert f"(img/{p.name})" in text
