"""graphmil.utils: segment ops against per-bag loops / numpy."""

import numpy as np
import pytest
import torch

from graphmil.utils import (
    index_to_ptr,
    ptr_to_index,
    resolve_index,
    segment_count,
    segment_rank,
    segment_softmax,
    segment_topk,
)


def _uneven(sizes, d=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    src = torch.randn(index.numel(), *(() if d is None else (d,)), generator=g)
    return src, index


@pytest.mark.parametrize("heads", [None, 3])
def test_segment_softmax_matches_per_bag_loop(heads):
    sizes = [1, 4, 9, 2]
    src, index = _uneven(sizes, heads)
    out = segment_softmax(src, index, len(sizes))
    ptr = index_to_ptr(index, len(sizes))
    for b in range(len(sizes)):
        ref = torch.softmax(src[ptr[b]:ptr[b + 1]], dim=0)
        torch.testing.assert_close(out[ptr[b]:ptr[b + 1]], ref)


def test_segment_softmax_large_logits_stable_and_permutation_invariant():
    src, index = _uneven([5, 7, 3])
    src = src * 1e4  # exp would overflow without the max shift
    out = segment_softmax(src, index, 3)
    assert torch.isfinite(out).all()
    perm = torch.randperm(src.numel())
    out_p = segment_softmax(src[perm], index[perm], 3)
    torch.testing.assert_close(out_p, out[perm])
    sums = torch.zeros(3).index_add_(0, index, out)
    torch.testing.assert_close(sums, torch.ones(3))


def test_segment_softmax_mask_equals_softmax_over_kept_and_nan_free():
    src, index = _uneven([4, 3, 5])
    src.requires_grad_(True)
    mask = torch.tensor([1, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1], dtype=torch.bool)  # bag 1 fully masked
    out = segment_softmax(src, index, 4, mask=mask)  # bag 3 is an empty dim_size row
    assert torch.isfinite(out).all()
    assert (out[~mask] == 0).all()
    torch.testing.assert_close(out[[0, 2]], torch.softmax(src[[0, 2]], 0))
    torch.testing.assert_close(out[7:], torch.softmax(src[7:], 0))
    (out * torch.randn(12)).sum().backward()
    assert torch.isfinite(src.grad).all()
    assert (src.grad[~mask] == 0).all()


def test_segment_softmax_mask_per_head_broadcast():
    src, index = _uneven([3, 4], 2)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    out = segment_softmax(src, index, 2, mask=mask)
    out2 = segment_softmax(src, index, 2, mask=mask.view(-1, 1).expand(-1, 2))
    torch.testing.assert_close(out, out2)
    assert (out[~mask] == 0).all()


def test_segment_rank_and_topk_match_numpy():
    src, index = _uneven([6, 1, 8, 3], seed=3)
    src[2] = src[1]  # a tie, broken by original order
    perm = torch.randperm(src.numel())
    s, i = src[perm], index[perm]
    rank = segment_rank(s, i, 4)
    for b in range(4):
        pos = (i == b).nonzero().flatten().numpy()
        order = pos[np.argsort(-s[pos].numpy(), kind="stable")]
        expected = np.empty(len(pos), dtype=np.int64)
        expected[np.searchsorted(pos, order)] = np.arange(len(pos))
        np.testing.assert_array_equal(rank[pos].numpy(), expected)
    asc = segment_rank(s, i, 4, descending=False)
    for b in range(4):
        pos = (i == b).nonzero().flatten()
        assert int(asc[pos][s[pos].argmin()]) == 0
    top = segment_topk(s, i, 2, 4)
    counts = torch.zeros(4, dtype=torch.long).index_add_(0, i, top.long())
    assert counts.tolist() == [2, 1, 2, 2]
    for b in range(4):
        pos = (i == b).nonzero().flatten()
        kept = set(pos[top[pos]].tolist())
        ref = set(pos[torch.argsort(s[pos], descending=True, stable=True)[:2]].tolist())
        assert kept == ref
    low = segment_topk(s, i, torch.tensor([1, 0, 3, 5]), 4, largest=False)
    assert torch.zeros(4, dtype=torch.long).index_add_(0, i, low.long()).tolist() == [1, 0, 3, 3]


def test_segment_rank_empty():
    assert segment_rank(torch.zeros(0), torch.zeros(0, dtype=torch.long), 2).numel() == 0


def test_index_ptr_round_trip_and_counts():
    index = torch.tensor([0, 0, 2, 2, 2, 3])  # bag 1 empty
    ptr = index_to_ptr(index, 5)
    assert ptr.tolist() == [0, 2, 2, 5, 6, 6]
    assert torch.equal(ptr_to_index(ptr), index)
    assert segment_count(index, 5).tolist() == [2, 0, 3, 1, 0]


def test_resolve_index_ptr_equals_index_and_errors():
    ptr = torch.tensor([0, 3, 3, 7])
    idx, b = resolve_index(7, None, ptr, None)
    assert b == 3 and idx.tolist() == [0, 0, 0, 2, 2, 2, 2]
    idx2, b2 = resolve_index(7, idx, None, 3)
    assert torch.equal(idx, idx2) and b2 == 3
    idx3, b3 = resolve_index(4, None, None, None)
    assert b3 == 1 and idx3.tolist() == [0] * 4
    with pytest.raises(ValueError, match="'dim_size'"):
        resolve_index(7, None, ptr, 5)
    with pytest.raises(ValueError, match="'ptr' covers 7"):
        resolve_index(8, None, ptr, None)
    with pytest.raises(ValueError, match="'index' must be"):
        resolve_index(5, torch.zeros(4, dtype=torch.long), None, None)
    assert resolve_index(0, torch.zeros(0, dtype=torch.long), None, None)[1] == 0
