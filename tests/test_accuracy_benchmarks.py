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


# Tolerances of the fold-parallel trainer vs. graphmil's own model (derivations, not fits).
#
# Both sides evaluate the same expression for a fold; they differ only in the order of the
# additions inside reductions (a vmap'ed bmm over the padded stack vs. one mm per bag, a fused vs.
# an unfused bias add, a softmax and a pooled sum over a padded row whose extra terms are exact
# zeros). Two orders of one sum of n terms differ by at most 2*gamma_n*sum|terms|, with
# gamma_n = n*u / (1 - n*u) and u the unit roundoff (Higham, "Accuracy and Stability of Numerical
# Algorithms", 2nd ed., Thm 3.1 / eq. 3.4). To first order, the differences of the K reductions met
# along a path of the forward (and backward) pass add up, so a computed value differs by at most
# 2*K*gamma_n*S, S the magnitude scale of the terms. We take S = KAPPA * max|value| over the tensor,
# KAPPA = 1e4 a generous cancellation allowance: with Kaiming-uniform weights (|w| <= 1/sqrt(fan_in))
# and |x| <= 3, terms of random sign sum to about sqrt(n) <= 20 times a typical entry, not 1e4.
# In float32 this bound is ~2*14*400*6e-8*1e4 = 6.7 relative: useless; in float64 it is ~1e-8,
# still eight orders of magnitude below what a wrong bag, fold or loss scale gives (O(1) relative).
# Hence the comparisons run in float64; the code path is the float32 one of the benchmark.
#
# Adam is a different matter: its update lr * m_hat / (sqrt(v_hat) + eps) normalises the gradient,
# so a gradient entry that is pure rounding noise (true value ~0) moves its weight by up to ~lr on
# either side, however small the noise -- in any precision where the noise exceeds eps. That is why
# comparing two free-running trainings entry by entry cannot be given an a-priori bound (and why the
# old float32 test failed on one entry of 8,192 on another CPU). So the training test compares the
# gradients with the bound above, then gives *both* optimisers the reference gradient and the
# reference weights (through the writable views of FoldParallel.fold_grads and the models' own
# parameters), so that what is left to compare is the optimiser itself: fused Adam on stacked rows
# vs. torch's default Adam on each model. Only the Adam arithmetic then differs, with no
# amplification (see _adam_tol), and the bound grows with the fold's step count t.
KAPPA = 1e4


def _sum_order_tol(ref: torch.Tensor, K: int, n: int) -> float:
    u = torch.finfo(ref.dtype).eps / 2
    gamma = n * u / (1 - n * u)
    return 2 * K * gamma * KAPPA * float(ref.detach().abs().max()) + torch.finfo(ref.dtype).tiny


def _adam_tol(theta: torch.Tensor, t: int, lr: float, betas=(0.9, 0.999)) -> torch.Tensor:
    r"""Entry-wise bound on |theta_a - theta_b| after one step from the same weights and the same
    gradients at every step, for two Adam implementations whose moments differ only by their own
    rounding (t = the fold's step count).

    Each implementation rounds at most 8 times per step on the way to each of m, v and the update,
    so per step the two differ by at most r = 16u relative to the magnitudes involved. With
    M = max_s |g_s| (weight decay included): |m| <= M, so |dm_t| <= r*t*M; v is a sum of positive
    terms, so |dv_t| <= r*t*v_t and |d sqrt(v)| / sqrt(v) <= r*t/2. With the bias-corrected
    m_hat = sum_s w_s g_s, v_hat = sum_s w'_s g_s^2 (weights summing to 1): sqrt(v_hat) >=
    sqrt(min_s w'_s) * M and |m_hat| <= c_t sqrt(v_hat), c_t = sqrt(sum_s w_s^2 / w'_s) (Cauchy-
    Schwarz). So the normalised update f = m_hat / (sqrt(v_hat) + eps) differs by at most
    r * (t / ((1 - b1^t) sqrt(min w')) + c_t (t/2 + 1)), and theta by lr times that plus r*|theta|.
    """
    b1, b2 = betas
    s = torch.arange(1, t + 1, dtype=torch.float64)
    w = (1 - b1) * b1 ** (t - s) / (1 - b1 ** t)
    w2 = (1 - b2) * b2 ** (t - s) / (1 - b2 ** t)
    c = float(torch.sqrt((w ** 2 / w2).sum()))
    r = 16 * torch.finfo(theta.dtype).eps / 2
    f = r * (t / ((1 - b1 ** t) * float(w2.min().sqrt())) + c * (t / 2 + 1))
    return lr * f + r * theta.abs()


@pytest.mark.parametrize("gated", [False, True])
def test_fold_parallel_forward_is_graphmils_abmil(classic, gated):
    from torch_geometric.data import Batch, Data

    dt = torch.float64
    torch.manual_seed(0)
    models = [classic.paper_abmil(12, gated).to(dt).eval() for _ in range(3)]
    refs = [copy.deepcopy(m) for m in models]
    fp = classic.FoldParallel(models, lr=1e-3, weight_decay=0.0, groups=[[0, 2], [1]]).train(False)
    bags = [torch.randn(n, 12, dtype=dt).clamp(-3, 3) for n in (5, 1, 9)]
    ref = torch.cat([m(Batch.from_data_list([Data(x=b)])).bag_logits.view(-1) for m, b in zip(refs, bags)])
    # 7 reductions in the forward, the longest over the 256 inputs of fc128
    tol = _sum_order_tol(ref, K=7, n=256)
    X, mask = classic.pad_bags(bags)
    torch.testing.assert_close(fp.forward(fp.rows([0, 1, 2]), X, mask), ref, rtol=0, atol=tol)
    X2, mask2 = classic.pad_bags([bags[2], bags[0]])  # a chunk of folds, in another order
    torch.testing.assert_close(fp.forward(fp.rows([2, 0]), X2, mask2), ref[[2, 0]], rtol=0, atol=tol)
    # the graphmil models hold the stacked weights (views, Linear weights in transposed layout):
    # the same outputs through their own forward, up to the summation order of that layout
    for f, (m, b) in enumerate(zip(models, bags)):
        torch.testing.assert_close(m(Batch.from_data_list([Data(x=b)])).bag_logits.view(-1), ref[f:f + 1],
                                   rtol=0, atol=tol)


def test_fold_parallel_training_is_torch_adam_per_fold(classic):
    """Three steps of FoldParallel == graphmil's ABMIL on its own bag with its own
    ``torch.optim.Adam``, fold by fold: the gradients (sum-order bound), then the Adam steps from the
    same weights and gradients (Adam rounding bound, growing with the step count); fold 1, a group
    of its own, sits out step 2 and keeps its weights, moments and step count exactly. Step 3 has a
    400-instance bag, so the bags are padded in two chunks gathered out of the stack's order."""
    from torch_geometric.data import Batch, Data

    dt, lr, wd = torch.float64, 1e-2, 1e-2
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(2)
    models = [classic.paper_abmil(6, True).to(dt).eval() for _ in range(3)]  # eval: no dropout draws
    refs = [copy.deepcopy(m) for m in models]
    fp = classic.FoldParallel(models, lr=lr, weight_decay=wd, groups=[[0, 2], [1]]).train(False)
    ref_opts = [torch.optim.Adam(r.parameters(), lr=lr, weight_decay=wd) for r in refs]
    schedule = [{0: 4, 1: 7, 2: 2}, {0: 9, 2: 3}, {0: 400, 1: 5, 2: 3}]
    steps = [0, 0, 0]
    for sizes in schedule:
        bags = {f: torch.randn(n, 6, generator=g, dtype=dt).clamp(-3, 3) for f, n in sizes.items()}
        labels = {f: float(f != 1) for f in sizes}
        fp.backward(bags, labels)
        for f in range(3):
            got = fp.fold_grads(f)
            if f not in bags:
                assert got is None
                continue
            ref_opts[f].zero_grad()
            logit = refs[f](Batch.from_data_list([Data(x=bags[f])])).bag_logits.view(-1)
            torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.tensor([labels[f]], dtype=dt)).backward()
            for n, q in refs[f].named_parameters():
                # 14 reductions along forward + backward, the longest over the <= 400 instances
                torch.testing.assert_close(got[n], q.grad, rtol=0, atol=_sum_order_tol(q.grad, K=14, n=400),
                                           msg=lambda m, f=f, n=n: f"fold {f} grad {n}: {m}")
                got[n].copy_(q.grad)
            ref_opts[f].step()
            steps[f] += 1
        sat_out = [f for f in range(3) if f not in bags]
        before = {f: [p.detach().clone() for p in models[f].parameters()] for f in sat_out}
        state_before = {id(p): {k: v.clone() for k, v in st.items()} for p, st in fp.opt.state.items()}
        fp.step()
        for f in range(3):
            for (n, a), b in zip(models[f].named_parameters(), refs[f].parameters()):
                if f in sat_out:
                    assert torch.equal(a, before[f][[k for k, _ in models[f].named_parameters()].index(n)])
                    continue
                diff = (a - b).detach().abs()
                tol = _adam_tol(b.detach(), steps[f], lr)
                assert bool((diff <= tol).all()), f"fold {f} {n}: max |diff| {float(diff.max()):.3g}"
                with torch.no_grad():
                    a.copy_(b)  # same weights again (the weight-decay term sees them)
        for gi, (lo, hi) in enumerate(fp.groups):
            if any(int(fp.row_of[f]) in range(lo, hi) for f in sat_out):
                for p in fp.slices[gi].values():  # the sat-out group's Adam state did not move
                    for k, v in fp.opt.state[p].items():
                        assert torch.equal(v, state_before[id(p)][k]), k
    assert steps == [3, 2, 3]
    assert [int(fp.opt.state[p]["step"]) for p in (fp.slices[0]["model.classifier.bias"],
                                                   fp.slices[1]["model.classifier.bias"])] == [3, 2]
    with pytest.raises(ValueError, match="step together"):
        fp.backward({0: torch.randn(3, 6, dtype=dt)}, {0: 1.0})  # fold 2 shares fold 0's group


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
