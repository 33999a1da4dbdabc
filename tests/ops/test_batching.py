"""graphmil.ops.batching: bag index and the slicing tables of a Batch changed in place."""

import torch
from torch_geometric.data import Batch, Data

from graphmil.ops.batching import bag_index, refresh_batch_slices


def _bags():
    out = []
    for n in (3, 1, 4):
        src = torch.arange(n)
        out.append(Data(x=torch.randn(n, 2), edge_index=torch.stack([src, (src + 1) % n]), tag=n))
    return out


def test_bag_index():
    bags = _bags()
    assert bag_index(bags[0]) == (None, 1)
    batch = Batch.from_data_list(bags)
    idx, num = bag_index(batch)
    assert torch.equal(idx, torch.tensor([0, 0, 0, 1, 2, 2, 2, 2])) and num == 3
    plain = Data(x=torch.randn(4, 1), batch=torch.tensor([0, 2, 2, 0]))
    assert bag_index(plain)[1] == 3
    # an empty trailing bag is counted from ptr / num_graphs, not from batch.max()
    with_empty = Batch.from_data_list(bags + [Data(x=torch.zeros(0, 2), edge_index=torch.zeros(2, 0, dtype=torch.long), tag=0)])
    assert bag_index(with_empty)[1] == 4


def test_refresh_batch_slices_round_trips_new_attributes():
    bags = _bags()
    batch = Batch.from_data_list(bags)
    # replace the edges (a different count per bag) and add node/graph attributes in place
    new = [torch.tensor([[0, 1], [1, 0]]), torch.zeros(2, 0, dtype=torch.long), torch.tensor([[0, 3, 2], [3, 0, 1]])]
    batch.edge_index = torch.cat([e + int(batch.ptr[i]) for i, e in enumerate(new)], 1)
    batch.score = torch.arange(8.0)
    batch.count = torch.tensor([7, 8, 9])
    refresh_batch_slices(batch, node=["score"], edge=["edge_index"], graph=["count"])
    parts = batch.to_data_list()
    for i, part in enumerate(parts):
        assert torch.equal(part.edge_index, new[i])
        assert torch.equal(part.score, torch.arange(8.0)[int(batch.ptr[i]):int(batch.ptr[i + 1])])
        assert int(part.count) == [7, 8, 9][i]
    # dropped keys are left out of to_data_list
    refresh_batch_slices(batch, drop=["score"])
    del batch.score
    assert "score" not in batch.to_data_list()[0]


def test_refresh_is_a_no_op_without_tables():
    d = Data(x=torch.randn(3, 1), edge_index=torch.zeros(2, 0, dtype=torch.long))
    refresh_batch_slices(d, edge=["edge_index"])  # no batch vector: nothing to do
    assert "ptr" not in d
