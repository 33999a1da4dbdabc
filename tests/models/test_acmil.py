"""ACMIL model: STKIM only in training, loss terms against their formulas, gradients."""

import torch
from torch_geometric.data import Batch

from graphmil import make_bag
from graphmil.losses import attention_diversity
from graphmil.models import bag_task_loss, create_model


def _batch(sizes=(1, 4, 25)):
    return Batch.from_data_list([make_bag(torch.randn(n, 12), y=i % 2) for i, n in enumerate(sizes)])


def test_train_masks_eval_does_not_and_losses():
    model = create_model("acmil", 12, 1, embed_dim=16, hidden_channels=8, branches=3)
    batch = _batch()
    out = model(batch)  # training mode
    keep = out.extra["mask"]
    dropped = torch.zeros(3, 3, dtype=torch.long).index_add_(0, batch.batch, (~keep).long())
    assert dropped.tolist() == [[0] * 3, [2] * 3, [6] * 3]
    terms = model.losses(out, batch)
    bl = out.extra["branch_logits"]
    ref_branches = torch.stack([bag_task_loss(bl[:, m], batch.y) for m in range(3)]).mean()
    torch.testing.assert_close(terms["branches"], ref_branches)
    torch.testing.assert_close(terms["task"], bag_task_loss(out.bag_logits, batch.y))
    torch.testing.assert_close(terms["diversity"], attention_diversity(out.attention, batch.batch, 3).mean())
    sum(terms.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    model.eval()
    ev = model(batch)
    assert "mask" not in ev.extra
    assert (ev.attention > 0).all()
    torch.testing.assert_close(ev.instance_scores, model.pool.attend(model.embed(batch.x), batch.batch, dim_size=3).logits.mean(-1))


def test_multiclass_branch_loss():
    model = create_model("acmil", 12, 3, embed_dim=16, branches=2)
    batch = _batch()
    batch.y = torch.tensor([0, 2, 1])
    out = model(batch)
    terms = model.losses(out, batch)
    bl = out.extra["branch_logits"]
    ref = torch.stack([torch.nn.functional.cross_entropy(bl[:, m], batch.y) for m in range(2)]).mean()
    torch.testing.assert_close(terms["branches"], ref)
