"""Masking helpers: STKIM counts and candidates, random subsets, NaN-free masking."""

import pytest
import torch

from graphmil.nn.masking import mask_logits, random_instance_mask, stkim_count, stkim_mask
from graphmil.utils import index_to_ptr, segment_softmax

SIZES = [1, 3, 10, 25, 7]


def _batch(sizes=SIZES, m=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    shape = (index.numel(),) if m is None else (index.numel(), m)
    return torch.randn(*shape, generator=g), index


def test_stkim_count_matches_acmil_rule():
    for n in range(0, 30):
        for k in (1, 5, 10):
            for r in (0.0, 0.3, 0.6, 0.7, 1.0):
                expected = (min(k, n) * round(r * 10)) // 10  # exact floor(min(K, N) * r)
                assert int(stkim_count(torch.tensor([n]), k, r)[0]) == expected, (n, k, r)
    assert stkim_count(torch.tensor([10, 3]), 10, 0.6).tolist() == [6, 1]


@pytest.mark.parametrize("m", [None, 4])
def test_stkim_masks_exactly_the_requested_number_among_top_k(m):
    logits, index = _batch(m=m)
    perm = torch.randperm(index.numel())  # unsorted index too
    logits, index = logits[perm], index[perm]
    keep = stkim_mask(logits, index, len(SIZES), top_k=10, mask_ratio=0.6)
    assert keep.shape == logits.shape and keep.dtype == torch.bool
    l2 = logits.view(logits.size(0), -1)
    k2 = keep.view(keep.size(0), -1)
    expected = [int(min(10, n) * 0.6) for n in SIZES]
    for b in range(len(SIZES)):
        rows = (index == b).nonzero().flatten()
        for h in range(l2.size(1)):
            dropped = rows[~k2[rows, h]]
            assert dropped.numel() == expected[b]
            top = rows[torch.topk(l2[rows, h], min(10, rows.numel())).indices]
            assert set(dropped.tolist()) <= set(top.tolist())


def test_stkim_is_uniform_over_candidates_and_seeded():
    logits = torch.arange(20.0)
    index = torch.zeros(20, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([~stkim_mask(logits, index, 1, 10, 0.6, generator=g) for _ in range(1500)]).float()
    freq = draws.mean(0)
    assert (freq[:10] == 0).all()  # the 10 smallest logits are never candidates
    assert torch.allclose(freq[10:], torch.full((10,), 0.6), atol=0.06)
    a = stkim_mask(logits, index, 1, generator=torch.Generator().manual_seed(3))
    b = stkim_mask(logits, index, 1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_stkim_fully_masked_bag_gives_zero_finite_attention():
    logits, index = _batch([4, 6], m=2)
    logits.requires_grad_(True)
    keep = stkim_mask(logits, index, 3, top_k=10, mask_ratio=1.0)  # bag 2 empty
    assert not keep.any()
    att = segment_softmax(logits, index, 3, mask=keep)
    assert torch.isfinite(att).all() and (att == 0).all()
    att.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_stkim_noop_cases_and_errors():
    logits, index = _batch()
    assert stkim_mask(logits, index, 5, top_k=0).all()
    assert stkim_mask(logits, index, 5, mask_ratio=0.0).all()
    with pytest.raises(ValueError, match="'mask_ratio'"):
        stkim_mask(logits, index, 5, mask_ratio=1.5)
    with pytest.raises(ValueError, match="'top_k'"):
        stkim_mask(logits, index, 5, top_k=-1)
    with pytest.raises(ValueError, match="'logits'"):
        stkim_mask(logits[:3], index, 5)


def test_random_instance_mask_counts_and_uniformity():
    _, index = _batch()
    perm = torch.randperm(index.numel())
    index = index[perm]
    keep = random_instance_mask(index, 6, 0.3, min_instances=2)  # bag 5 empty
    counts = torch.zeros(6, dtype=torch.long).index_add_(0, index, keep.long())
    assert counts.tolist() == [min(n, max(int(n * 0.3), 2)) for n in SIZES] + [0]
    g = torch.Generator().manual_seed(0)
    idx = torch.zeros(10, dtype=torch.long)
    freq = torch.stack([random_instance_mask(idx, 1, 0.5, generator=g) for _ in range(1000)]).float().mean(0)
    assert torch.allclose(freq, torch.full((10,), 0.5), atol=0.07)
    assert random_instance_mask(torch.zeros(0, dtype=torch.long), 0, 0.5).numel() == 0
    with pytest.raises(ValueError, match="'ratio'"):
        random_instance_mask(index, 5, -0.1)
    with pytest.raises(ValueError, match="'min_instances'"):
        random_instance_mask(index, 5, 0.5, min_instances=-1)


def test_mask_logits_is_finite_and_matches_masked_softmax_on_partial_bags():
    logits, index = _batch([3, 4])
    mask = torch.tensor([1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    ml = mask_logits(logits, mask)
    assert torch.isfinite(ml).all() and torch.equal(ml[mask], logits[mask])
    ptr = index_to_ptr(index, 2)
    att = segment_softmax(logits, index, 2, mask=mask)
    for b in range(2):
        s = slice(int(ptr[b]), int(ptr[b + 1]))
        torch.testing.assert_close(torch.softmax(ml[s], 0), att[s])
    assert mask_logits(logits, None) is logits
    two = mask_logits(torch.randn(7, 2), mask)
    assert (two[~mask] == torch.finfo(two.dtype).min).all()
