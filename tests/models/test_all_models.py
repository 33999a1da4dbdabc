"""One common test over every registered model: forward + backward on a batch of uneven spatial
bags, gradients reach every parameter, no NaN, output shapes, batched ≡ one bag at a time."""

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data

from graphmil.models import MILOutput, create_model, list_models, model_parameters

D = 16


def grid_edges(rows: int, cols: int) -> torch.Tensor:
    """8-neighbour edges of a full ``rows × cols`` integer grid (row-major node order), symmetric,
    no self-loops — built by brute force over all pairs (independent of graphmil.transforms)."""
    rc = np.array([(r, c) for r in range(rows) for c in range(cols)])
    d = np.abs(rc[:, None, :] - rc[None, :, :]).max(-1)
    src, dst = np.nonzero(d == 1)
    return torch.as_tensor(np.stack([src, dst]), dtype=torch.long)


def grid_bag(rows: int, cols: int, y: int, seed: int, num_features: int = D) -> Data:
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    pos = torch.tensor([(c, r) for r in range(rows) for c in range(cols)], dtype=torch.long)
    y_inst = torch.zeros(n, dtype=torch.long)
    if y > 0:
        y_inst[: max(1, n // 3)] = 1
    x = torch.randn(n, num_features, generator=g) + y_inst[:, None].float()
    return Data(x=x, pos=pos, edge_index=grid_edges(rows, cols), y=torch.tensor([y]), y_inst=y_inst)


def bags(num_classes: int = 1):
    shapes = [(3, 4), (2, 3), (5, 5), (1, 3), (4, 2)]
    labels = [1, 0, 1, 0, 0] if num_classes <= 2 else [1, 0, 2, 0, 2]
    return [grid_bag(r, c, y, seed=i) for i, ((r, c), y) in enumerate(zip(shapes, labels))]


def build(name: str, num_classes: int, data):
    torch.manual_seed(0)
    model = create_model(name, D, num_classes)
    if name == "casii":
        model.prepare(data, progress=False)
    return model


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name, num_classes):
    data = bags(num_classes)
    model = build(name, num_classes, data)
    model.train()
    batch = Batch.from_data_list(data)
    out = model(batch)
    assert isinstance(out, MILOutput)
    B, N = len(data), batch.num_nodes
    assert out.bag_logits.shape == (B, num_classes)
    assert out.instance_scores is not None and out.instance_scores.shape == (N,)
    if out.attention is not None:
        assert out.attention.shape[0] == N and out.attention.dim() in (1, 2)
    if out.batch is not None:
        assert torch.equal(out.batch, batch.batch)
    assert torch.isfinite(out.bag_logits).all() and torch.isfinite(out.instance_scores).all()
    terms = model.losses(out, batch, epoch=100)  # past any warm-up: every loss term active
    loss = sum(terms.values())
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient reaches {missing}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradients in {bad}"


@pytest.mark.parametrize("name", list_models())
def test_batched_equals_one_bag_at_a_time(name):
    data = bags(1)
    model = build(name, 1, data).eval()
    with torch.no_grad():
        out = model(Batch.from_data_list(data))
        for b, bag in enumerate(data):
            one = model(Batch.from_data_list([bag]))
            torch.testing.assert_close(out.bag_logits[b], one.bag_logits[0], atol=1e-4, rtol=1e-4)
            ptr = Batch.from_data_list(data).ptr
            torch.testing.assert_close(out.instance_scores[ptr[b]:ptr[b + 1]], one.instance_scores,
                                       atol=1e-4, rtol=1e-4)


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="Did you mean 'abmil'") as e:
        create_model("abmill", D)
    for name in list_models():
        assert name in str(e.value)


def test_registry_has_the_issue_models():
    expected = {"abmil", "meanmil", "maxmil", "dsmil", "acmil", "smap", "smtap", "casii", "ainet"}
    missing = expected - set(list_models())
    assert not missing, f"models not registered: {sorted(missing)}"


@pytest.mark.parametrize("name", list_models())
def test_wrong_feature_width_and_missing_label_are_clear_errors(name):
    data = bags()
    model = build(name, 1, data)
    wrong = Batch.from_data_list([grid_bag(3, 4, y=1, seed=0, num_features=D + 3)])
    with pytest.raises(ValueError, match=rf"x \[N, {D}\].*got shape \(12, {D + 3}\)"):
        model(wrong)
    batch = Batch.from_data_list(data)
    out = model(batch)
    del batch.y
    with pytest.raises(ValueError, match="no bag label 'y'"):
        model.losses(out, batch)


# Non-default hyperparameters for the spec round trip (small, valid for D = 16).
NON_DEFAULT = {
    "abmil": dict(embed_dim=(8, 4), attention_dim=6, gated=False, dropout=0.1),
    "acmil": dict(embed_dim=8, hidden_channels=6, branches=3, top_k=2, mask_ratio=0.5),
    "ainet": dict(embed_dim=8, heads=2, anchors="topk", k=3, neighbour=None, share_attention=False),
    "casii": dict(hidden_channels=8, t=4, r=2, warmup_epochs=0),
    "dsmil": dict(embed_dim=8, query_channels=4, passing_v=True),
    "maxmil": dict(embed_dim=[8, 6]),
    "meanmil": dict(embed_dim=(8,), dropout=0.2),
    "smap": dict(embed_dim=8, hidden_channels=4, where="late", K=3, learn_alpha=False),
    "smtap": dict(embed_dim=8, hidden_channels=4, heads=2, num_layers=1, sm_pool=False),
}


def test_non_default_table_covers_every_model():
    assert sorted(NON_DEFAULT) == list_models()


@pytest.mark.parametrize("kw", ["default", "non-default"])
@pytest.mark.parametrize("name", list_models())
def test_hparams_repr_and_attributes(name, kw):
    kwargs = NON_DEFAULT[name] if kw == "non-default" else {}
    model = create_model(name, D, 2, **kwargs)
    hp = model.hparams
    params = model_parameters(name)
    assert list(hp) == list(params)  # every constructor hyperparameter, in signature order
    for k, default in params.items():
        assert hp[k] == kwargs.get(k, default)
        assert getattr(model, k) is hp[k] or k == "keys"  # `keys` is CASii's key-bank property
    text = model.extra_repr()
    assert text.startswith(f"in_channels={D}, num_classes=2, ") and text in repr(model)
    for k, v in hp.items():
        shown = repr(list(v)) if isinstance(v, tuple) else repr(v)  # a tuple as the spec's list
        assert f"{k}={shown}" in text, (k, text)
    hp["embed_dim"] = "changed"  # a copy
    assert model.hparams.get("embed_dim") != "changed"


@pytest.mark.parametrize("kw", ["default", "non-default"])
@pytest.mark.parametrize("name", list_models())
def test_spec_round_trip_through_json_and_yaml(name, kw):
    import json

    import yaml

    model = create_model(name, D, 3, **(NON_DEFAULT[name] if kw == "non-default" else {}))
    spec = model.spec()
    assert set(spec) == {"name", "in_channels", "num_classes", "kwargs"}
    assert spec["name"] == name and spec["in_channels"] == D and spec["num_classes"] == 3
    for s in (json.loads(json.dumps(spec)), yaml.safe_load(yaml.safe_dump(spec))):
        assert s == spec  # plain data: tuples are already lists
        other = create_model(s["name"], s["in_channels"], s["num_classes"], **s["kwargs"])
        assert repr(other) == repr(model)
        assert {k: v.shape for k, v in other.state_dict().items()} == \
               {k: v.shape for k, v in model.state_dict().items()}
        assert other.spec() == spec
