"""MultiBranchAttentionAggregation (ACMIL) against ACMIL's per-bag forward with the module's weights."""

import pytest
import torch
import torch.nn.functional as F

from graphmil.nn.aggr import MultiBranchAttentionAggregation
from graphmil.utils import index_to_ptr

SIZES = [6, 1, 14, 3]


def _batch(sizes=SIZES, f=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return torch.randn(index.numel(), f, generator=g), index


def _reference_bag(pool, x, keep=None):
    """ACMIL_GA.forward for one bag (K x N attention), masking with the given keep mask."""
    att = pool.attention
    A = (torch.tanh(att.V(x)) * torch.sigmoid(att.U(x))) @ att.w.weight.T  # N x M
    A = A.T  # M x N
    if keep is not None:
        A = A.masked_fill(~keep.T, -1e9)
    a = F.softmax(A, dim=1)
    afeat = a @ x  # M x F
    bag_a = a.mean(0, keepdim=True)
    return a.T, afeat, (bag_a @ x)[0]


def test_eval_matches_reference_per_bag_and_permutation():
    pool = MultiBranchAttentionAggregation(8, hidden_channels=6, branches=3).eval()
    x, index = _batch()
    out = pool.attend(x, index)
    assert out.extra["mask"] is None
    ptr = index_to_ptr(index, 4)
    for b in range(4):
        s = slice(int(ptr[b]), int(ptr[b + 1]))
        a, afeat, z = _reference_bag(pool, x[s])
        torch.testing.assert_close(out.attention[s], a)
        torch.testing.assert_close(out.extra["branch_pooled"][b], afeat)
        torch.testing.assert_close(out.pooled[b], z)
        torch.testing.assert_close(out.extra["bag_attention"][s], a.mean(1))
    perm = torch.randperm(x.size(0))
    out_p = pool.attend(x[perm], index[perm], dim_size=4)
    torch.testing.assert_close(out_p.pooled, out.pooled)
    torch.testing.assert_close(out_p.attention, out.attention[perm])
    out_ptr = pool.attend(x, ptr=index_to_ptr(index, 4))
    torch.testing.assert_close(out_ptr.pooled, out.pooled)
    torch.testing.assert_close(pool(x, index), out.pooled)
    sums = torch.zeros(4, 3).index_add_(0, index, out.attention)
    torch.testing.assert_close(sums, torch.ones(4, 3))


def test_training_applies_stkim_with_exact_counts_and_matches_reference():
    pool = MultiBranchAttentionAggregation(8, branches=5, top_k=10, mask_ratio=0.6).train()
    x, index = _batch()
    out = pool.attend(x, index, generator=torch.Generator().manual_seed(0))
    keep = out.extra["mask"]
    assert keep.shape == (x.size(0), 5)
    dropped = torch.zeros(4, 5, dtype=torch.long).index_add_(0, index, (~keep).long())
    expected = torch.tensor([int(min(10, n) * 0.6) for n in SIZES]).view(-1, 1).expand(4, 5)
    assert torch.equal(dropped, expected)
    assert (out.attention[~keep] == 0).all()
    ptr = index_to_ptr(index, 4)
    for b in range(4):
        s = slice(int(ptr[b]), int(ptr[b + 1]))
        a, afeat, z = _reference_bag(pool, x[s], keep[s])
        torch.testing.assert_close(out.attention[s], a)
        torch.testing.assert_close(out.pooled[b], z)


def test_fully_masked_bag_and_empty_rows_are_finite_zero():
    pool = MultiBranchAttentionAggregation(8, branches=2, top_k=10, mask_ratio=1.0).train()
    x, index = _batch([3, 20])
    x.requires_grad_(True)
    out = pool.attend(x, index * 2, dim_size=4)  # bag 0: 3 <= K so all masked; rows 1, 3 empty
    assert torch.isfinite(out.pooled).all() and torch.isfinite(out.attention).all()
    assert (out.pooled[[0, 1, 3]] == 0).all() and (out.extra["branch_pooled"][[0, 1, 3]] == 0).all()
    assert (out.attention[:3] == 0).all()
    out.pooled.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_user_mask_combines_with_stkim_and_gradients():
    pool = MultiBranchAttentionAggregation(8, branches=3, dropout=0.1).train()
    x, index = _batch()
    mask = torch.rand(x.size(0)) > 0.3
    out = pool.attend(x, index, mask=mask)
    assert (out.attention[~mask] == 0).all()
    assert (~out.extra["mask"][~mask]).all()
    (out.pooled.pow(2).sum() + out.extra["branch_pooled"].sum()).backward()
    for name, p in pool.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_repr_reset_and_errors():
    pool = MultiBranchAttentionAggregation(8, hidden_channels=4, branches=3, top_k=5, mask_ratio=0.5)
    assert repr(pool) == ("MultiBranchAttentionAggregation(8, hidden_channels=4, branches=3, top_k=5, "
                          "mask_ratio=0.5, dropout=0.0)")
    w = pool.attention.w.weight.clone()
    pool.reset_parameters()
    assert not torch.equal(w, pool.attention.w.weight)
    with pytest.raises(ValueError, match="'branches'"):
        MultiBranchAttentionAggregation(8, branches=0)
    with pytest.raises(ValueError, match="'mask_ratio'"):
        MultiBranchAttentionAggregation(8, mask_ratio=2.0)
    with pytest.raises(ValueError, match="expected x with 8 features"):
        pool(torch.randn(3, 4))
