"""DSMILAggregation against the authors' per-bag formulation with the module's own weights."""

import math

import pytest
import torch
import torch.nn.functional as F

from graphmil.nn.aggr import DSMILAggregation
from graphmil.utils import index_to_ptr

SIZES = [6, 1, 11, 3]


def _batch(sizes=SIZES, f=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return torch.randn(index.numel(), f, generator=g), index


def _reference_bag(pool, feats):
    """One bag as in DSMIL's released code (BClassifier.forward), batch size 1."""
    c = pool.instance_classifier(feats)  # N x C
    V = pool.v(feats)
    Q = pool.q(feats)
    _, m_indices = torch.sort(c, 0, descending=True)
    q_max = pool.q(feats.index_select(0, m_indices[0, :]))  # C x Q
    A = F.softmax(Q @ q_max.T / math.sqrt(Q.shape[1]), 0)  # N x C
    B = A.T @ V  # C x F
    bag = pool.bag_classifier(B.unsqueeze(0)).view(-1)  # C
    return c, c.max(0).values, A, B, bag


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("nonlinear,passing_v", [(True, False), (False, True)])
def test_matches_reference_per_bag(num_classes, nonlinear, passing_v):
    pool = DSMILAggregation(8, num_classes, query_channels=5, nonlinear=nonlinear, passing_v=passing_v)
    x, index = _batch()
    out = pool.attend(x, index)
    ptr = index_to_ptr(index, len(SIZES))
    for b in range(len(SIZES)):
        s = slice(int(ptr[b]), int(ptr[b + 1]))
        c, cmax, A, B, bag = _reference_bag(pool, x[s])
        torch.testing.assert_close(out.extra["instance_logits"][s], c)
        torch.testing.assert_close(out.extra["max_logits"][b], cmax)
        torch.testing.assert_close(out.extra["bag_logits"][b], bag)
        torch.testing.assert_close(out.attention[s], A if num_classes > 1 else A[:, 0])
        torch.testing.assert_close(out.pooled[b], B if num_classes > 1 else B[0])
        crit = out.extra["critical"][b]
        torch.testing.assert_close(out.extra["instance_logits"][crit, torch.arange(num_classes)], cmax)


def test_permutation_ptr_and_attention_sums():
    pool = DSMILAggregation(8, 2)
    x, index = _batch()
    out = pool.attend(x, index, dim_size=4)
    perm = torch.randperm(x.size(0))
    out_p = pool.attend(x[perm], index[perm], dim_size=4)
    torch.testing.assert_close(out_p.pooled, out.pooled)
    torch.testing.assert_close(out_p.attention, out.attention[perm])
    torch.testing.assert_close(out_p.extra["bag_logits"], out.extra["bag_logits"])
    # critical rows refer to the permuted input: same instances
    assert torch.equal(perm[out_p.extra["critical"]], out.extra["critical"])
    out_ptr = pool.attend(x, ptr=index_to_ptr(index, 4))
    torch.testing.assert_close(out_ptr.pooled, out.pooled)
    sums = torch.zeros(4, 2).index_add_(0, index, out.attention)
    torch.testing.assert_close(sums, torch.ones(4, 2))


def test_ties_pick_first_critical_instance():
    pool = DSMILAggregation(4)
    x = torch.randn(3, 4)
    x = torch.cat([x, x[:1], x])  # bag 0 = rows 0..2, bag 1 = rows 3..6 with a duplicate max row
    index = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    out = pool.attend(x, index)
    crit = out.extra["critical"][:, 0]
    c = out.extra["instance_logits"][:, 0]
    for b, (lo, hi) in enumerate([(0, 3), (3, 7)]):
        first = lo + int(torch.nonzero(c[lo:hi] == c[lo:hi].max())[0])
        assert int(crit[b]) == first


def test_empty_rows_mask_and_gradients():
    pool = DSMILAggregation(8, 1)
    x, index = _batch([4, 5])
    x.requires_grad_(True)
    index = index * 2  # bags 0, 2; bag 1 empty
    mask = torch.ones(9, dtype=torch.bool)
    mask[[0, 1, 2, 3]] = False  # bag 0 fully masked
    mask[5] = False
    out = pool.attend(x, index, dim_size=3, mask=mask)
    assert torch.isfinite(out.pooled).all() and torch.isfinite(out.extra["max_logits"]).all()
    assert (out.pooled[[0, 1]] == 0).all()
    assert (out.attention[~mask] == 0).all()
    assert int(out.extra["critical"][1, 0]) == -1 and int(out.extra["critical"][0, 0]) == -1
    ref = pool.attend(x[[4, 6, 7, 8]])
    torch.testing.assert_close(out.pooled[2], ref.pooled[0])
    torch.testing.assert_close(out.extra["max_logits"][2], ref.extra["max_logits"][0])
    (out.pooled.sum() + out.extra["max_logits"].sum() + out.extra["bag_logits"].sum()).backward()
    assert torch.isfinite(x.grad).all()


def test_gradients_reach_every_parameter():
    pool = DSMILAggregation(8, 2, passing_v=True)
    x, index = _batch()
    out = pool.attend(x, index)
    (out.extra["bag_logits"].sum() + out.extra["max_logits"].sum()).backward()
    for name, p in pool.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_repr_reset_and_errors():
    pool = DSMILAggregation(8, 2, query_channels=4)
    assert repr(pool) == "DSMILAggregation(8, num_classes=2, query_channels=4, nonlinear=True, passing_v=False, dropout=0.0)"
    w = pool.instance_classifier.weight.clone()
    pool.reset_parameters()
    assert not torch.equal(w, pool.instance_classifier.weight)
    with pytest.raises(ValueError, match="'num_classes'"):
        DSMILAggregation(8, 0)
    with pytest.raises(ValueError, match="expected x with 8 features"):
        pool(torch.randn(3, 4))
    with pytest.raises(ValueError, match="'mask'"):
        pool.attend(torch.randn(3, 8), mask=torch.ones(2, dtype=torch.bool))
