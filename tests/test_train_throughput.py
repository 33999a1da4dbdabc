"""The throughput benchmark compares like with like: same function on both sides, same adjacency."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_torchmil_batch_matches_torchmil_normalisation(bench):
    pytest.importorskip("torchmil")
    from torchmil.utils import normalize_adj

    bags = bench.make_bags(3, 20, 60, 8, 0)
    X, adj, mask, Y = bench.torchmil_batch(bags)
    n_max = max(b.num_nodes for b in bags)
    assert X.shape == (3, n_max, 8) and mask.shape == (3, n_max) and Y.shape == (3,)
    dense = adj.to_dense()
    for i, b in enumerate(bags):
        n = b.num_nodes
        assert torch.equal(X[i, :n], b.x) and int(mask[i].sum()) == n and not X[i, n:].any()
        ei = b.edge_index.numpy()
        ref = np.zeros((n_max, n_max), dtype=np.float32)
        ref[ei[0], ei[1]] = normalize_adj(ei, None, n)  # torchmil's own normalisation
        np.testing.assert_allclose(dense[i].numpy(), ref, rtol=1e-6, atol=1e-7)


def test_graphmil_and_torchmil_models_compute_the_same_function(bench):
    pytest.importorskip("torchmil")
    lines = bench.check_equivalence(D=16)
    assert len(lines) == 2 and all("(equal)" in line for line in lines), lines


def test_copied_weights_matter(bench):
    """The equivalence check can fail: a perturbed torchmil weight changes the logits."""
    pytest.importorskip("torchmil")
    from torch_geometric.data import Batch

    bags = bench.make_bags(2, 30, 60, 16, 1)
    X, adj, mask, _ = bench.torchmil_batch(bags)
    g, t = bench.graphmil_model("smap", 16).eval(), bench.torchmil_model("smap", 16).eval()
    bench.copy_graphmil_to_torchmil(g, t, "smap")
    with torch.no_grad():
        t.pool.sm.sm.coef.fill_(3.0)  # alpha 0.25 instead of 0.5
        assert not torch.allclose(g(Batch.from_data_list(bags)).bag_logits.view(-1), t(X, adj, mask), atol=1e-6)


def test_update_section(bench, tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# T\n\n<!-- k:begin -->\nold\n<!-- k:end -->\ntail\n")
    bench.update_section(str(page), "k", ["new", "[a](../b.md)"])
    assert page.read_text() == "# T\n\n<!-- k:begin -->\nnew\n[a](b.md)\n<!-- k:end -->\ntail\n"
    bench.update_section(str(page), "missing", ["x"])  # no markers: unchanged
    assert "x" not in page.read_text()
