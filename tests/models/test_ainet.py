import pytest
import torch
from torch_geometric.data import Batch

from graphmil.data import make_bag
from graphmil.models import create_model, list_models
from graphmil.transforms.regions import RegionPartition, grid_adjacency


def bag(n, d=16, y=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = 5
    pos = torch.stack([torch.arange(n) % w, torch.arange(n) // w], 1) * 256
    return make_bag(torch.randn(n, d, generator=g), pos=pos, y=y,
                    edge_index=torch.from_numpy(grid_adjacency(pos)) if n > 1 else torch.zeros(2, 0, dtype=torch.long))


@pytest.mark.parametrize("kwargs", [{}, {"neighbour": "graph", "share_attention": False},
                                    {"neighbour": None, "anchors": "topk", "embed_dim": 8, "num_classes": 3}])
@pytest.mark.parametrize("precomputed", [True, False])
def test_forward_backward_uneven_bags(kwargs, precomputed):
    assert "ainet" in list_models()
    kwargs = dict(kwargs)
    C = kwargs.pop("num_classes", 1)
    bags = [bag(n, y=i % max(C, 2) if C > 1 else i % 2, seed=i) for i, n in enumerate([37, 4, 1, 23])]
    if precomputed:
        bags = [RegionPartition(4)(b) for b in bags]
    batch = Batch.from_data_list(bags)
    model = create_model("ainet", 16, num_classes=C, num_regions=4, heads=4, **kwargs)
    out = model(batch)
    N = batch.num_nodes
    assert out.bag_logits.shape == (4, C)
    assert out.instance_scores.shape == (N,) and out.attention.shape == (N,) and torch.equal(out.batch, batch.batch)
    keep = out.extra["keep"]
    assert (out.attention[~keep] == 0).all()
    sums = torch.zeros(4).index_add_(0, batch.batch, out.attention)
    torch.testing.assert_close(sums, torch.ones(4))
    R = out.extra["region_batch"].numel()
    assert out.extra["region_logits"].shape == (R, C)
    terms = model.losses(out, batch)
    assert set(terms) == {"task", "region", "consistency"}
    sum(terms.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_batched_equals_per_bag_and_consistency_term():
    bags = [RegionPartition(4)(bag(n, seed=i)) for i, n in enumerate([30, 9, 2])]
    model = create_model("ainet", 16, num_regions=4, heads=4, lambda_consistency=0.5).eval()
    out = model(Batch.from_data_list(bags))
    singles = [model(Batch.from_data_list([b])) for b in bags]
    torch.testing.assert_close(out.bag_logits, torch.cat([s.bag_logits for s in singles]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.instance_scores, torch.cat([s.instance_scores for s in singles]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.extra["region_logits"], torch.cat([s.extra["region_logits"] for s in singles]),
                               rtol=1e-4, atol=1e-5)
    x = torch.cat([b.x for b in bags])
    phi = model.front_end.dam.phi
    torch.testing.assert_close(out.aux_losses["consistency"], 0.5 * ((phi(x) - x) ** 2).mean())


def test_bad_config():
    with pytest.raises(ValueError, match="heads"):
        create_model("ainet", 10, heads=8)
    model = create_model("ainet", 16, heads=4)
    b = Batch.from_data_list([make_bag(torch.randn(3, 16), y=0)])
    with pytest.raises(ValueError, match="pos"):
        model(b)
