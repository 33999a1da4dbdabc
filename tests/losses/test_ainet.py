import numpy as np
import pytest
import torch

from graphmil.losses.ainet import AINetConsistencyLoss, AINetRegionLoss, consistency_loss, region_loss


def test_consistency_is_elementwise_mse():
    x, r = torch.randn(7, 5), torch.randn(7, 5)
    want = ((x.numpy() - r.numpy()) ** 2).mean()
    np.testing.assert_allclose(float(consistency_loss(x, r)), want, rtol=1e-6)
    np.testing.assert_allclose(float(AINetConsistencyLoss(0.5)(x, r)), 0.5 * want, rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        consistency_loss(x, r[:3])


def _bce(z, y):
    return -(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-z))))


def test_region_loss_binary_is_mean_over_regions_then_bags():
    region_batch = torch.tensor([0, 0, 0, 1, 2, 2])
    logits = torch.randn(6, 1, dtype=torch.float64)
    y = torch.tensor([1, 0, 1])
    z = logits.view(-1).numpy()
    per_bag = [np.mean([_bce(z[m], y[b].item()) for m in range(6) if region_batch[m] == b]) for b in range(3)]
    np.testing.assert_allclose(float(region_loss(logits, y, region_batch, 3)), np.mean(per_bag), rtol=1e-10)
    np.testing.assert_allclose(float(AINetRegionLoss(2.0)(logits, y, region_batch)), 2 * np.mean(per_bag), rtol=1e-10)


def test_region_loss_multiclass_cross_entropy():
    region_batch = torch.tensor([0, 1, 1, 1])
    logits = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([2, 0])
    lz = logits.numpy()
    ce = lambda m, c: -(lz[m, c] - np.log(np.exp(lz[m]).sum()))
    want = np.mean([ce(0, 2), np.mean([ce(m, 0) for m in (1, 2, 3)])])
    np.testing.assert_allclose(float(region_loss(logits, y, region_batch)), want, rtol=1e-10)
    with pytest.raises(ValueError, match="region_batch"):
        region_loss(logits, y, region_batch[:2])
