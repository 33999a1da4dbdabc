"""ACMIL diversity loss against a per-bag loop of torch.cosine_similarity (the authors' code)."""

import pytest
import torch

from graphmil.losses import DiversityLoss, attention_diversity
from graphmil.utils import index_to_ptr, segment_softmax

SIZES = [5, 2, 9, 3]


def _att(m=4, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return segment_softmax(torch.randn(index.numel(), m, generator=g), index, len(sizes)), index


def _authors(att_bag):
    """ACMIL's training loop: attn [1, M, N] (already softmaxed), double loop over branch pairs."""
    attn = att_bag.T.unsqueeze(0)
    m = attn.size(1)
    d = torch.zeros(())
    for i in range(m):
        for j in range(i + 1, m):
            d = d + torch.cosine_similarity(attn[:, i], attn[:, j], dim=-1).mean() / (m * (m - 1) / 2)
    return d


def test_matches_authors_loop_per_bag_and_permutation():
    att, index = _att()
    perm = torch.randperm(index.numel())
    d = attention_diversity(att[perm], index[perm], 4)
    ptr = index_to_ptr(index, 4)
    ref = torch.stack([_authors(att[ptr[b]:ptr[b + 1]]) for b in range(4)])
    torch.testing.assert_close(d, ref)
    loss = DiversityLoss(0.5)(att, index, 4)
    torch.testing.assert_close(loss, 0.5 * ref.mean())
    torch.testing.assert_close(DiversityLoss()(att, index, 6), ref.mean())  # empty rows ignored


def test_identical_and_disjoint_branches():
    index = torch.zeros(4, dtype=torch.long)
    same = torch.full((4, 3), 0.25)
    assert attention_diversity(same, index).item() == pytest.approx(1.0)
    disjoint = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    assert attention_diversity(disjoint, index).item() == pytest.approx(0.0)


def test_single_branch_masked_and_gradients():
    att, index = _att(m=1)
    assert (attention_diversity(att, index, 4) == 0).all()
    logits = torch.randn(8, 3, requires_grad=True)
    index = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    keep = torch.ones(8, 3, dtype=torch.bool)
    keep[:3, 0] = False  # branch 0 of bag 0 fully masked: zero vector, cosine 0, finite gradient
    a = segment_softmax(logits, index, 2, mask=keep)
    d = attention_diversity(a, index, 2)
    ref0 = _authors(a[:3].detach())
    torch.testing.assert_close(d[0], ref0)
    DiversityLoss()(a, index, 2).backward()
    assert torch.isfinite(logits.grad).all()


def test_repr_and_errors():
    assert repr(DiversityLoss()) == "DiversityLoss(weight=1.0, eps=1e-08)"
    with pytest.raises(ValueError, match="'attention'"):
        attention_diversity(torch.rand(5))
    with pytest.raises(ValueError, match="'weight'"):
        DiversityLoss(-1)
