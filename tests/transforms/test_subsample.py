"""RandomSubsample against Data.subgraph with the same random draw, on bags and batches."""

import pytest
import torch
from torch_geometric.data import Batch

from graphmil import make_bag
from graphmil.nn.masking import random_instance_mask
from graphmil.transforms import RandomSubsample


def _bag(n, seed=0, y=1):
    g = torch.Generator().manual_seed(seed)
    pos = torch.stack([torch.arange(n) % 5, torch.arange(n) // 5], 1)
    src = torch.arange(n - 1)
    ei = torch.cat([torch.stack([src, src + 1]), torch.stack([src + 1, src])], 1)
    w = torch.rand(ei.size(1), generator=g)
    return make_bag(torch.randn(n, 4, generator=g), pos=pos, y=y, y_inst=torch.arange(n) % 2,
                    edge_index=ei, edge_weight=w, slide_id=f"s{seed}")


def test_counts_and_consistent_restriction_on_a_bag():
    bag = _bag(23)
    bag.score = torch.arange(23.0)  # any node-level attribute follows
    out = RandomSubsample(0.3, seed=0)(bag)
    assert out.num_nodes == int(23 * 0.3)
    keep = random_instance_mask(torch.zeros(23, dtype=torch.long), 1, 0.3, generator=torch.Generator().manual_seed(0))
    ref = bag.subgraph(keep)
    for key in ("x", "pos", "y_inst", "edge_index", "edge_weight", "score", "y"):
        assert torch.equal(out[key], ref[key]), key
    assert out.slide_id == "s0"
    # the kept rows are the rows of the original, in order, and edges join kept neighbours only
    rows = out.score.long()
    assert torch.equal(out.x, bag.x[rows]) and (rows[1:] > rows[:-1]).all()
    src, dst = rows[out.edge_index[0]], rows[out.edge_index[1]]
    assert ((src - dst).abs() == 1).all()
    expected_edges = int(((rows[1:] - rows[:-1]) == 1).sum()) * 2
    assert out.edge_index.size(1) == expected_edges


def test_min_instances_fresh_draw_per_call_and_seed():
    bag = _bag(10)
    t = RandomSubsample(0.05, min_instances=3, seed=1)
    a, b = t(bag), t(bag)
    assert a.num_nodes == 3 and b.num_nodes == 3
    draws = {tuple(t(bag).y_inst.tolist() + t(bag).pos[:, 0].tolist()) for _ in range(10)}
    assert len(draws) > 1
    assert torch.equal(RandomSubsample(0.5, seed=7)(bag).x, RandomSubsample(0.5, seed=7)(bag).x)
    assert RandomSubsample(1.0)(bag).num_nodes == 10
    one = RandomSubsample(0.1)(_bag(2))
    assert one.num_nodes == 1 and one.edge_index.size(1) == 0


def test_batch_is_subsampled_per_bag_and_unbatches():
    bags = [_bag(n, seed=i, y=i % 2) for i, n in enumerate([7, 2, 15])]
    for i, bag in enumerate(bags):
        bag.score = torch.arange(bag.num_nodes) + 100.0 * i
    batch = Batch.from_data_list(bags)
    out = RandomSubsample(0.5, seed=3)(batch)
    assert out.ptr.tolist() == [0, 3, 4, 11]
    assert out.batch.tolist() == [0] * 3 + [1] + [2] * 7
    parts = out.to_data_list()
    for i, (part, bag) in enumerate(zip(parts, bags)):
        rows = part.score.long() - 100 * i
        assert torch.equal(part.x, bag.x[rows])
        assert torch.equal(part.y, bag.y)
        keep = torch.zeros(bag.num_nodes, dtype=torch.bool)
        keep[rows] = True
        ref = bag.subgraph(keep)
        assert torch.equal(part.edge_index, ref.edge_index)
        assert torch.equal(part.edge_weight, ref.edge_weight)
    assert torch.equal(Batch.from_data_list(parts).edge_index, out.edge_index)


def test_repr_and_errors():
    assert repr(RandomSubsample(0.5, min_instances=2, seed=3)) == (
        "RandomSubsample(ratio=0.5, min_instances=2, generator=None, seed=3)")
    # every constructor argument shows: different arguments, different reprs (dataset cache keys)
    reprs = [repr(t) for t in (RandomSubsample(0.5), RandomSubsample(0.25), RandomSubsample(0.5, min_instances=3),
                               RandomSubsample(0.5, seed=1), RandomSubsample(0.5, seed=2),
                               RandomSubsample(0.5, generator=torch.Generator().manual_seed(7)))]
    assert len(set(reprs)) == len(reprs), reprs
    with pytest.raises(ValueError, match="'ratio'"):
        RandomSubsample(0.0)
    with pytest.raises(ValueError, match="'min_instances'"):
        RandomSubsample(0.5, min_instances=-1)
