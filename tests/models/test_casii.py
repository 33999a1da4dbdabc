"""The registered CASii model: key bank from the negative training bags, losses, save/load."""

import io

import pytest
import torch
from torch_geometric.data import Batch, Data

from graphmil import make_bag
from graphmil.losses import CASiiInstanceLoss
from graphmil.models import create_model
from graphmil.nn.casii import select_negative_keys

D = 10


def bags(seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes, labels = [6, 3, 9, 4, 7], [0, 1, 0, 1, 0]
    return [make_bag(torch.randn(n, D, generator=g), y=y, slide_id=f"s{i}")
            for i, (n, y) in enumerate(zip(sizes, labels))]


def test_prepare_uses_negative_bags_only():
    data = bags()
    model = create_model("casii", in_channels=D, hidden_channels=8, t=4)
    with pytest.raises(ValueError, match="prepare"):
        model(Batch.from_data_list(data))
    model.prepare(data, progress=False)
    want = select_negative_keys([b for b in data if int(b.y) == 0], t=4, progress=False)
    assert torch.equal(model.keys, want)
    assert model.key_info.bag_index.unique().tolist() == [0, 1, 2]  # positions among the negatives
    with pytest.raises(ValueError, match="negative bags"):
        model.prepare([b for b in data if int(b.y) == 1], progress=False)


def test_forward_losses_and_batched_equals_single():
    data = bags()
    model = create_model("casii", in_channels=D, hidden_channels=8, t=4, warmup_epochs=1).double()
    model.prepare(data, progress=False)
    batch = Batch.from_data_list(data)
    batch.x = batch.x.double()
    out = model(batch)
    assert out.bag_logits.shape == (5, 1) and out.instance_scores.shape == (29,)
    pool_out = model.pool.attend(batch.x, batch.batch, dim_size=5)
    torch.testing.assert_close(out.instance_scores, pool_out.logits)
    torch.testing.assert_close(out.bag_logits, model.classifier(pool_out.pooled))
    for i, d in enumerate(data):
        single = model(Data(x=d.x.double(), y=d.y))
        torch.testing.assert_close(single.bag_logits[0], out.bag_logits[i])
    terms0 = model.losses(out, batch, epoch=0)
    assert set(terms0) == {"task", "instance"} and terms0["instance"].item() == 0.0
    terms = model.losses(out, batch, epoch=1)
    want = CASiiInstanceLoss(5, 0.5, 0.5, 0)(out.instance_scores, out.batch, batch.y, 0)
    torch.testing.assert_close(terms["instance"], want)
    sum(terms.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_state_dict_round_trip_keeps_keys():
    data = bags()
    model = create_model("casii", in_channels=D, hidden_channels=8, t=3)
    model.prepare(data, progress=False)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    assert "pool.keys" in sd
    batch = Batch.from_data_list(data)
    for other in (create_model("casii", in_channels=D, hidden_channels=8),
                  create_model("casii", in_channels=D, hidden_channels=8, keys=torch.randn(40, D))):
        other.load_state_dict(sd)
        assert torch.equal(other.keys, model.keys)
        torch.testing.assert_close(other(batch).bag_logits, model(batch).bag_logits, rtol=0, atol=0)


def test_multiclass_positive_is_nonzero_class():
    g = torch.Generator().manual_seed(1)
    data = [make_bag(torch.randn(5, D, generator=g), y=c) for c in (0, 2, 1, 0)]
    model = create_model("casii", in_channels=D, num_classes=3, hidden_channels=8, warmup_epochs=0)
    model.prepare(data, progress=False)
    assert model.keys.size(0) == 10  # two class-0 bags, full rank 5 each
    batch = Batch.from_data_list(data)
    out = model(batch)
    assert out.bag_logits.shape == (4, 3)
    terms = model.losses(out, batch, epoch=0)
    want = CASiiInstanceLoss(5, 0.5, 0.5, 0)(out.instance_scores, out.batch, torch.tensor([0, 1, 1, 0]), 0)
    torch.testing.assert_close(terms["instance"], want)


def test_repr_and_args():
    model = create_model("casii", in_channels=D, t=7, r=2)
    assert model.t == 7 and model.r == 2 and model.instance_loss.r == 2
    assert "t=7" in repr(model) and "num_keys=0" in repr(model)
    with pytest.raises(ValueError, match="'t'"):
        create_model("casii", in_channels=D, t=0)


def _prepare_like_the_trainer(model, train_bags, rebuild=False):
    # the trainer's rule: prepare only when the model is not prepared, or a rebuild is asked for
    if rebuild or not model.is_prepared:
        model.prepare(train_bags, progress=False)


def test_is_prepared_and_a_given_key_bank_is_kept():
    data = bags()
    fresh = create_model("casii", in_channels=D, hidden_channels=8, t=4)
    assert not fresh.is_prepared
    _prepare_like_the_trainer(fresh, data)
    assert fresh.is_prepared and fresh.keys.size(0) > 0
    built = fresh.keys.clone()
    _prepare_like_the_trainer(fresh, bags(seed=5))  # prepared: left alone
    assert torch.equal(fresh.keys, built)

    given = torch.randn(37, D)
    model = create_model("casii", in_channels=D, hidden_channels=8, keys=given)
    assert model.is_prepared and model.pool.num_keys == 37
    _prepare_like_the_trainer(model, data)
    assert model.pool.num_keys == 37 and torch.equal(model.keys, given)
    _prepare_like_the_trainer(model, data, rebuild=True)  # an explicit rebuild does rebuild
    assert torch.equal(model.keys, select_negative_keys([b for b in data if int(b.y) == 0], t=50, progress=False))

    loaded = create_model("casii", in_channels=D, hidden_channels=8)
    loaded.load_state_dict(fresh.state_dict())
    assert loaded.is_prepared and torch.equal(loaded.keys, built)
    assert create_model("abmil", in_channels=D).is_prepared  # nothing to prepare


def test_spec_leaves_the_key_bank_to_the_state_dict():
    import json

    model = create_model("casii", in_channels=D, hidden_channels=8, t=3, keys=torch.randn(37, D))
    spec = json.loads(json.dumps(model.spec()))
    assert "keys" not in spec["kwargs"] and spec["kwargs"]["t"] == 3
    assert "keys=Tensor[37, 10]" in repr(model) and "num_keys=37" in repr(model)
    other = create_model(spec["name"], spec["in_channels"], spec["num_classes"], **spec["kwargs"])
    assert not other.is_prepared
    other.load_state_dict(model.state_dict())
    assert other.is_prepared and other.pool.num_keys == 37
    batch = Batch.from_data_list(bags())
    torch.testing.assert_close(other(batch).bag_logits, model(batch).bag_logits, rtol=0, atol=0)
