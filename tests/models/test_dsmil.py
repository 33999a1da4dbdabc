"""DSMIL model: prediction and loss against the two streams, gradients on uneven bags."""

import pytest
import torch
from torch_geometric.data import Batch

from graphmil import make_bag
from graphmil.models import bag_task_loss, create_model


def _batch(sizes=(1, 4, 13), num_classes=1):
    bags = [make_bag(torch.randn(n, 12), y=i % max(2, num_classes)) for i, n in enumerate(sizes)]
    return Batch.from_data_list(bags)


@pytest.mark.parametrize("num_classes", [1, 3])
def test_outputs_losses_and_gradients(num_classes):
    model = create_model("dsmil", 12, num_classes, embed_dim=16, query_channels=8)
    batch = _batch(num_classes=num_classes)
    out = model(batch)
    mx, bg = out.extra["max_logits"], out.extra["bag_stream_logits"]
    torch.testing.assert_close(out.bag_logits, 0.5 * (mx + bg))
    inst = out.extra["instance_logits"]
    expected_scores = inst[:, 0] if num_classes == 1 else inst[:, 1:].max(-1).values
    torch.testing.assert_close(out.instance_scores, expected_scores)
    assert out.attention.shape == ((18,) if num_classes == 1 else (18, num_classes))
    # max stream = per-bag max of the instance logits
    for b, (lo, hi) in enumerate([(0, 1), (1, 5), (5, 18)]):
        torch.testing.assert_close(mx[b], inst[lo:hi].max(0).values)
    terms = model.losses(out, batch)
    torch.testing.assert_close(terms["task_max"], 0.5 * bag_task_loss(mx, batch.y))
    torch.testing.assert_close(terms["task_bag"], 0.5 * bag_task_loss(bg, batch.y))
    sum(terms.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_single_bag_equals_batched():
    model = create_model("dsmil", 12, 1, embed_dim=16).eval()
    batch = _batch()
    out = model(batch)
    one = model(batch.get_example(2))
    torch.testing.assert_close(one.bag_logits[0], out.bag_logits[2])
