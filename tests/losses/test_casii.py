"""CASiiInstanceLoss against a hand-written per-bag formula."""

import math

import pytest
import torch

from graphmil.losses import CASiiInstanceLoss


def bce(s, y):
    return -(y * math.log(torch.sigmoid(torch.tensor(s, dtype=torch.float64)).item())
             + (1 - y) * math.log(1 - torch.sigmoid(torch.tensor(s, dtype=torch.float64)).item()))


def per_bag_reference(s, index, labels, r, lb, lt, num_bags):
    """Python loop: per bag, r lowest toward 0, r highest toward 1 (positives), mean, mean over bags."""
    total, bags = 0.0, 0
    for b in range(num_bags):
        vals = [float(v) for v in s[index == b]]
        if not vals:
            continue
        srt = sorted(vals)
        low, high = srt[:r], srt[::-1][:r]
        loss = lb * sum(bce(v, 0) for v in low) / len(low)
        if bool((labels[b] != 0).any()):
            loss += lt * sum(bce(v, 1) for v in high) / len(high)
        total += loss
        bags += 1
    return total / bags


@pytest.mark.parametrize("r", [1, 3, 5])
def test_matches_per_bag_formula(r):
    g = torch.Generator().manual_seed(3)
    sizes = [9, 2, 0, 7, 1, 12]
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    perm = torch.randperm(index.numel(), generator=g)  # unsorted batch index
    index = index[perm]
    s = torch.randn(index.numel(), generator=g, dtype=torch.float64) * 3
    labels = torch.tensor([1, 0, 1, 0, 1, 1])
    loss_fn = CASiiInstanceLoss(r=r, lambda_bot=0.3, lambda_top=0.7, warmup_epochs=2)
    got = loss_fn(s, index, labels, epoch=2)
    want = per_bag_reference(s, index, labels, r, 0.3, 0.7, len(sizes))
    assert abs(float(got) - want) < 1e-12


def test_gradient_reaches_only_selected_logits():
    s = torch.tensor([0.5, -1.0, 2.0, 0.1, -3.0, 4.0, 1.0], requires_grad=True)
    index = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    loss = CASiiInstanceLoss(r=1, lambda_bot=1.0, lambda_top=1.0, warmup_epochs=0)(
        s, index, torch.tensor([[1], [0]]), epoch=0)
    loss.backward()
    nz = (s.grad != 0).nonzero().flatten().tolist()
    assert nz == [2, 4, 6]  # bag 0: lowest (4) and highest (2); bag 1 negative: lowest only (6)
    sig = torch.sigmoid(s.detach())
    torch.testing.assert_close(s.grad[[2, 4, 6]], torch.stack([sig[2] - 1, sig[4], sig[6]]) / 2)


def test_warmup_returns_zero_with_graph():
    s = torch.randn(10, requires_grad=True)
    index = torch.tensor([0] * 4 + [1] * 6)
    loss_fn = CASiiInstanceLoss()
    for epoch in range(5):
        out = loss_fn(s, index, torch.tensor([1, 0]), epoch=epoch)
        assert out.item() == 0.0 and out.requires_grad
        out.backward()
        assert torch.all(s.grad == 0)
    assert loss_fn(s, index, torch.tensor([1, 0]), epoch=5).item() > 0


def test_positive_definition_multiclass_and_multilabel():
    s = torch.randn(8, dtype=torch.float64)
    index = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    loss_fn = CASiiInstanceLoss(r=2, warmup_epochs=0)
    ref = per_bag_reference(s, index, torch.tensor([[2], [0], [1]]), 2, 0.5, 0.5, 3)
    assert abs(float(loss_fn(s, index, torch.tensor([2, 0, 1]))) - ref) < 1e-12
    multi = torch.tensor([[0, 1], [0, 0], [1, 1]])
    assert abs(float(loss_fn(s, index, multi)) - ref) < 1e-12
    # dim_size inferred from the labels; an index without it works the same
    assert abs(float(loss_fn(s, index, torch.tensor([2, 0, 1]), dim_size=3)) - ref) < 1e-12


def test_errors_and_repr():
    with pytest.raises(ValueError, match="'r'"):
        CASiiInstanceLoss(r=0)
    with pytest.raises(ValueError, match="'lambda_bot'"):
        CASiiInstanceLoss(lambda_bot=-1)
    with pytest.raises(ValueError, match="'bag_labels'"):
        CASiiInstanceLoss(warmup_epochs=0)(torch.randn(4), torch.tensor([0, 0, 1, 1]), torch.tensor([1, 0, 1]),
                                           epoch=0, dim_size=2)
    assert repr(CASiiInstanceLoss()) == "CASiiInstanceLoss(r=5, lambda_bot=0.5, lambda_top=0.5, warmup_epochs=5)"
