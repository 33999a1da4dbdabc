import pytest
import torch
from torch_geometric.data import Batch, Data
from torch_geometric.utils import erdos_renyi_graph, to_dense_adj, to_undirected

from graphmil.nn.aggr import SmAttentionAggregation


def dense_sm(u, ei, n, alpha, K, index):
    A = to_dense_adj(ei, max_num_nodes=n)[0].to(u.dtype).T
    single = torch.bincount(index)[index] == 1  # one-instance bags get a self-loop
    A = A + torch.diag((single & (A.sum(1) == 0)).to(u.dtype))
    d = A.sum(1)
    dinv = torch.where(d > 0, d.pow(-0.5), torch.zeros_like(d))
    Ahat = dinv[:, None] * A * dinv[None]
    g = u
    for _ in range(K):
        g = alpha * Ahat @ g + (1 - alpha) * u
    return g


def make_batch(sizes=(6, 9, 1, 4), F=8, seed=0):
    bags = []
    for i, n in enumerate(sizes):
        ei = to_undirected(erdos_renyi_graph(n, 0.4), num_nodes=n)
        bags.append(Data(x=torch.randn(n, F, dtype=torch.float64), edge_index=ei))
    return Batch.from_data_list(bags), bags


def seg_softmax_loop(e, index, B):
    out = torch.empty_like(e)
    for b in range(B):
        m = index == b
        out[m] = torch.softmax(e[m], 0)
    return out


@pytest.mark.parametrize("where", ["early", "mid", "late"])
def test_matches_hand_written_formula(where):
    batch, _ = make_batch()
    pool = SmAttentionAggregation(8, hidden_channels=5, where=where, alpha=0.5, K=10).double().eval()
    with torch.no_grad():
        pool.sm.theta.fill_(0.4)
    a = float(torch.sigmoid(torch.tensor(0.4, dtype=torch.float64)))
    x, ei, idx, n = batch.x, batch.edge_index, batch.batch, batch.num_nodes
    out = pool.attend(x, idx, edge_index=ei)
    V, bV, w = pool.V.weight, pool.V.bias, pool.w.weight  # effective (spectrally normalised) weights
    if where == "early":
        h = dense_sm(x, ei, n, a, 10, idx)
        e = torch.tanh(h @ V.T + bV) @ w.T
    elif where == "mid":
        h = x
        e = torch.tanh(dense_sm(x @ V.T + bV, ei, n, a, 10, idx)) @ w.T
    else:
        h = x
        e = dense_sm(torch.tanh(x @ V.T + bV) @ w.T, ei, n, a, 10, idx)
    e = e.view(-1)
    att = seg_softmax_loop(e, idx, 4)
    pooled = torch.stack([(att[idx == b, None] * h[idx == b]).sum(0) for b in range(4)])
    torch.testing.assert_close(out.logits, e)
    torch.testing.assert_close(out.attention, att)
    torch.testing.assert_close(out.pooled, pooled)
    torch.testing.assert_close(pool(x, idx, edge_index=ei), pooled)


@pytest.mark.parametrize("where,normed", [("early", {"V", "w"}), ("mid", {"w"}), ("late", set())])
def test_spectral_norm_placement(where, normed):
    pool = SmAttentionAggregation(8, hidden_channels=6, where=where).eval()
    for name in ("V", "w"):
        lin = getattr(pool, name)
        sigma = torch.linalg.matrix_norm(lin.weight.detach(), ord=2)
        if name in normed:
            assert abs(float(sigma) - 1.0) < 1e-3
            assert hasattr(lin, "parametrizations")
        else:
            assert not hasattr(lin, "parametrizations")
    off = SmAttentionAggregation(8, hidden_channels=6, where=where, spectral_norm=False)
    assert not hasattr(off.V, "parametrizations") and not hasattr(off.w, "parametrizations")


def test_reset_parameters_redraws_spectral_normed_weights():
    pool = SmAttentionAggregation(8, hidden_channels=6).eval()
    before = pool.V.weight.detach().clone()
    pool.reset_parameters()
    after = pool.V.weight.detach()
    assert not torch.allclose(before, after)
    assert abs(float(torch.linalg.matrix_norm(after, ord=2)) - 1.0) < 1e-3


@pytest.mark.parametrize("where", ["early", "mid", "late"])
def test_batch_equals_bags_alone_and_ptr_equals_index(where):
    batch, bags = make_batch()
    pool = SmAttentionAggregation(8, hidden_channels=5, where=where).double().eval()
    out = pool.attend(batch.x, batch.batch, edge_index=batch.edge_index)
    alone = [pool.attend(b.x, edge_index=b.edge_index) for b in bags]
    torch.testing.assert_close(out.pooled, torch.cat([o.pooled for o in alone]))
    torch.testing.assert_close(out.attention, torch.cat([o.attention for o in alone]))
    out_ptr = pool.attend(batch.x, ptr=batch.ptr, edge_index=batch.edge_index)
    torch.testing.assert_close(out_ptr.pooled, out.pooled)
    sums = torch.zeros(4, dtype=torch.float64).index_add_(0, batch.batch, out.attention)
    torch.testing.assert_close(sums, torch.ones(4, dtype=torch.float64))


def test_gradients_reach_alpha_and_are_finite():
    batch, _ = make_batch()
    pool = SmAttentionAggregation(8, hidden_channels=5, where="late").double()
    x = batch.x.clone().requires_grad_()
    pool(x, batch.batch, edge_index=batch.edge_index).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert pool.sm.theta.grad is not None and torch.isfinite(pool.sm.theta.grad)


def test_missing_edge_index_and_bad_args():
    pool = SmAttentionAggregation(8)
    with pytest.raises(ValueError, match="edge_index"):
        pool(torch.randn(3, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="where"):
        SmAttentionAggregation(8, where="middle")
    with pytest.raises(ValueError, match="features"):
        pool(torch.randn(3, 4), edge_index=torch.empty(2, 0, dtype=torch.long))


def test_repr():
    r = repr(SmAttentionAggregation(8, hidden_channels=4, where="mid"))
    assert "where='mid'" in r and "hidden_channels=4" in r and "spectral_norm=True" in r
