"""Shared fixtures of the training-engine tests: small synthetic bags, a fast config, a small ABMIL."""

import pytest
import torch

from graphmil.models import create_model
from graphmil.train import TrainConfig


@pytest.fixture(scope="module")
def bags():
    from graphmil.datasets import SyntheticBags

    ds = SyntheticBags(num_bags=16, num_features=8, seed=3, min_instances=6, max_instances=20, signal=2.0)
    return [ds[i] for i in range(len(ds))]


def _cfg(**kw):
    base = dict(epochs=2, batch_size=4, lr=1e-3, progress=False, device="cpu", scheduler="none")
    base.update(kw)
    return TrainConfig(**base)


def _small(seed=0, name="abmil", **kw):
    torch.manual_seed(seed)
    return create_model(name, 8, **({"embed_dim": 8, "attention_dim": 4} if name == "abmil" else {}), **kw)


def _params(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])



@pytest.fixture
def cfg():
    """``cfg(**overrides)``: 2 epochs, batch 4, lr 1e-3, CPU, no schedule, no progress bars."""
    return _cfg


@pytest.fixture
def small():
    """``small(seed, name)``: a seeded small model for 8 features."""
    return _small


@pytest.fixture
def params():
    """``params(model)``: all parameters as one flat tensor."""
    return _params
