"""AttentionAggregation (ABMIL) against hand-written formulas, per-bag loops and permutations."""

import pytest
import torch

from graphmil.nn.aggr import AttentionAggregation
from graphmil.utils import index_to_ptr

SIZES = [5, 1, 12, 3]


def _batch(sizes=SIZES, f=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return torch.randn(index.numel(), f, generator=g), index


def _formula(pool, x):
    """e = w^T tanh(Vx+b) [⊙ σ(Ux+b)] written with the module's own weights."""
    h = torch.tanh(x @ pool.V.weight.T + pool.V.bias)
    if pool.gated:
        h = h * torch.sigmoid(x @ pool.U.weight.T + pool.U.bias)
    return h @ pool.w.weight.T  # [n, H]


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("heads", [1, 3])
def test_matches_hand_written_formula_per_bag(gated, heads):
    pool = AttentionAggregation(8, hidden_channels=6, gated=gated, heads=heads)
    x, index = _batch()
    out = pool.attend(x, index)
    ptr = index_to_ptr(index, len(SIZES))
    for b in range(len(SIZES)):
        xb = x[ptr[b]:ptr[b + 1]]
        e = _formula(pool, xb)  # [n, H]
        a = torch.softmax(e, dim=0)
        z = a.T @ xb  # [H, F]
        if heads == 1:
            e, a, z = e[:, 0], a[:, 0], z[0]
        torch.testing.assert_close(out.logits[ptr[b]:ptr[b + 1]], e)
        torch.testing.assert_close(out.attention[ptr[b]:ptr[b + 1]], a)
        torch.testing.assert_close(out.pooled[b], z)
    assert out.pooled.shape == ((4, 8) if heads == 1 else (4, heads, 8))
    torch.testing.assert_close(pool(x, index), out.pooled)
    assert torch.equal(out.index, index)


def test_batched_equals_one_by_one_module_call():
    pool = AttentionAggregation(8)
    x, index = _batch()
    out = pool.attend(x, index)
    ptr = index_to_ptr(index, len(SIZES))
    for b in range(len(SIZES)):
        single = pool.attend(x[ptr[b]:ptr[b + 1]])  # no index: one bag
        torch.testing.assert_close(single.pooled[0], out.pooled[b])
        torch.testing.assert_close(single.attention, out.attention[ptr[b]:ptr[b + 1]])


@pytest.mark.parametrize("heads", [1, 2])
def test_permuted_batch_and_ptr(heads):
    pool = AttentionAggregation(8, heads=heads)
    x, index = _batch()
    out = pool.attend(x, index, dim_size=4)
    perm = torch.randperm(x.size(0))
    out_p = pool.attend(x[perm], index[perm], dim_size=4)  # unsorted index
    torch.testing.assert_close(out_p.pooled, out.pooled)
    torch.testing.assert_close(out_p.attention, out.attention[perm])
    torch.testing.assert_close(out_p.logits, out.logits[perm])
    out_ptr = pool.attend(x, ptr=index_to_ptr(index, 4))
    torch.testing.assert_close(out_ptr.pooled, out.pooled)
    torch.testing.assert_close(out_ptr.attention, out.attention)
    sums = torch.zeros(4, *out.attention.shape[1:]).index_add_(0, index, out.attention)
    torch.testing.assert_close(sums, torch.ones_like(sums))


def test_empty_dim_size_rows_are_zero():
    pool = AttentionAggregation(8, heads=2)
    x, index = _batch([3, 4])
    index = index * 2  # bags 0 and 2; bags 1, 3, 4 empty
    out = pool.attend(x, index, dim_size=5)
    assert out.pooled.shape == (5, 2, 8)
    assert (out.pooled[[1, 3, 4]] == 0).all()
    assert torch.isfinite(out.pooled).all()


def test_mask_drops_instances_and_fully_masked_bag_is_finite():
    pool = AttentionAggregation(8)
    x, index = _batch()
    x.requires_grad_(True)
    mask = torch.ones(x.size(0), dtype=torch.bool)
    mask[5] = False  # bag 1 (one instance) fully masked
    mask[[6, 7]] = False
    out = pool.attend(x, index, mask=mask)
    assert torch.isfinite(out.pooled).all() and (out.pooled[1] == 0).all()
    assert (out.attention[~mask] == 0).all()
    ref = pool.attend(x[8:18], None)  # bag 2 without its two masked rows
    torch.testing.assert_close(out.pooled[2], ref.pooled[0])
    out.pooled.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_gradients_reach_every_parameter():
    pool = AttentionAggregation(8, heads=2, dropout=0.1)
    x, index = _batch()
    pool.attend(x, index).pooled.pow(2).sum().backward()
    for name, p in pool.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_dropout_only_in_training():
    pool = AttentionAggregation(8, dropout=0.5)
    x, index = _batch()
    pool.eval()
    torch.testing.assert_close(pool(x, index), pool(x, index))
    pool.train()
    assert not torch.allclose(pool(x, index), pool(x, index))


def test_repr_reset_and_errors():
    pool = AttentionAggregation(8, hidden_channels=4, gated=False, heads=2, dropout=0.1)
    assert repr(pool) == "AttentionAggregation(8, hidden_channels=4, gated=False, heads=2, dropout=0.1)"
    assert pool.U is None
    w = pool.V.weight.clone()
    pool.reset_parameters()
    assert not torch.equal(w, pool.V.weight)
    with pytest.raises(ValueError, match="'heads'"):
        AttentionAggregation(8, heads=0)
    with pytest.raises(ValueError, match="expected x with 8 features"):
        pool(torch.randn(3, 5))
    with pytest.raises(ValueError, match="2-D input"):
        pool(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="'ptr' covers"):
        pool(torch.randn(3, 8), ptr=torch.tensor([0, 2]))
