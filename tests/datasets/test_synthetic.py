import math

import networkx as nx
import numpy as np
import pytest
import torch
from torch_geometric.data import Batch
from torch_geometric.loader import DataLoader

from graphmil.datasets import SyntheticBags
from graphmil.ops.geometry import grid_edges


def _oracle_edges(cells: np.ndarray) -> set:
    """Brute force: all ordered pairs at Chebyshev distance exactly 1 (8-neighbours)."""
    d = np.abs(cells[:, None, :] - cells[None, :, :]).max(-1)
    src, dst = np.nonzero(d == 1)
    return set(zip(src.tolist(), dst.tolist()))


def _edge_set(edge_index) -> set:
    return set(map(tuple, edge_index.t().tolist()))


def _assert_same_bag(a, b):
    for key in ("x", "pos", "edge_index", "y", "y_inst", "blob"):
        assert torch.equal(a[key], b[key]), key


def test_deterministic_per_seed_and_order_independent():
    a = SyntheticBags(num_bags=6, num_features=8, seed=3, in_memory=False)
    b = SyntheticBags(num_bags=6, num_features=8, seed=3, in_memory=True)
    order = [5, 0, 3, 1, 4, 2]
    got_b = {i: b[i] for i in order}
    for i in range(6):
        _assert_same_bag(a[i], got_b[i])
        _assert_same_bag(b[i], got_b[i])  # the cache returns the same tensors again
    c = SyntheticBags(num_bags=6, num_features=8, seed=4)
    assert not torch.equal(c.labels, a.labels) or any(
        c[i].num_nodes != a[i].num_nodes or not torch.equal(c[i].x, a[i].x) for i in range(6)
    )
    assert all(c[i].x.shape != a[i].x.shape or not torch.equal(c[i].x, a[i].x) for i in range(6))


def test_cache_returns_copies():
    ds = SyntheticBags(num_bags=2, num_features=4, seed=0, in_memory=True)
    bag = ds[0]
    bag.x.zero_()
    assert ds[0].x.abs().sum() > 0


def test_labels_balanced_and_consistent_with_instances():
    ds = SyntheticBags(num_bags=20, num_features=4, seed=1, pos_fraction=0.3, min_instances=30, max_instances=80)
    assert int(ds.labels.sum()) == round(0.3 * 20)
    for i in range(len(ds)):
        bag = ds[i]
        assert int(bag.y) == int(ds.labels[i])
        assert bag.y.shape == (1,)
        if int(bag.y) == 1:
            assert int(bag.y_inst.sum()) >= 1
        else:
            assert int(bag.y_inst.sum()) == 0 and int(bag.blob.max()) == 0
        assert torch.equal(bag.y_inst, (bag.blob > 0).long())


@pytest.mark.parametrize("seed", [0, 7])
def test_blobs_are_connected_in_8_neighbour_grid(seed):
    ds = SyntheticBags(num_bags=12, num_features=4, seed=seed, min_instances=60, max_instances=600,
                       pos_fraction=1.0, max_blobs=3, tumour_fraction=(0.05, 0.4))
    for i in range(len(ds)):
        bag = ds[i]
        cells = (bag.pos // ds.patch_size).numpy()
        g = nx.Graph()
        g.add_nodes_from(range(bag.num_nodes))
        g.add_edges_from(_oracle_edges(cells))  # independent of the dataset's own edge_index
        blob = bag.blob.numpy()
        ids = sorted(set(blob[blob > 0].tolist()))
        assert 1 <= len(ids) <= ds.max_blobs
        for b in ids:
            nodes = np.flatnonzero(blob == b).tolist()
            assert nx.is_connected(g.subgraph(nodes)), (i, b)
        lo, hi = ds.tumour_fraction
        assert int(bag.y_inst.sum()) <= math.ceil(hi * bag.num_nodes) + ds.max_blobs


def test_edges_equal_bruteforce_oracle():
    ds = SyntheticBags(num_bags=4, num_features=4, seed=2, min_instances=20, max_instances=300, patch_size=512)
    for i in range(len(ds)):
        bag = ds[i]
        cells = (bag.pos // 512).numpy()
        assert _edge_set(bag.edge_index) == _oracle_edges(cells)
        assert not (bag.edge_index[0] == bag.edge_index[1]).any()
        assert bag.step_level0 == 512 and bag.patch_size_level0 == 512


def test_edges_equal_grid_edges_transform():
    graph = pytest.importorskip("graphmil.transforms.graph")
    ds = SyntheticBags(num_bags=3, num_features=4, seed=5)
    for i in range(len(ds)):
        bag = ds[i]
        e, step = graph.grid_edges(bag.pos, step=ds.patch_size, connectivity=8)
        assert step == ds.patch_size
        assert _edge_set(e) == _edge_set(bag.edge_index)


def test_shared_builder_on_integer_cells_with_holes():
    # SyntheticBags builds its edges with graphmil.ops.geometry.grid_edges (step = 1 cell here)
    rng = np.random.default_rng(0)
    cells = np.argwhere(rng.random((15, 17)) < 0.6) + np.array([3, -2])
    e, step = grid_edges(cells, step=1, check_step=False)
    assert step == 1 and _edge_set(e) == _oracle_edges(cells)
    assert grid_edges(np.zeros((0, 2), dtype=np.int64), step=1)[0].shape == (2, 0)
    assert grid_edges(np.array([[4, 4]]), step=1)[0].shape == (2, 0)


def test_edges_sorted_symmetric_and_equal_to_oracle_at_other_patch_sizes():
    # after the switch to the shared builder: same graph as the brute-force oracle, canonical order
    for patch_size in (224, 256, 1000):
        ds = SyntheticBags(num_bags=3, num_features=2, seed=9, min_instances=30, max_instances=250,
                           max_pieces=3, patch_size=patch_size)
        for i in range(len(ds)):
            bag = ds[i]
            cells = ((bag.pos - bag.pos.min(0).values) // patch_size).numpy()
            assert _edge_set(bag.edge_index) == _oracle_edges(cells)
            key = bag.edge_index[0] * bag.num_nodes + bag.edge_index[1]
            assert bool((key[1:] > key[:-1]).all())  # sorted by (row, col), no duplicates
            assert bag.edge_index.dtype == torch.long


def test_positions_are_unique_lattice_points_in_scan_order():
    ds = SyntheticBags(num_bags=3, num_features=4, seed=0)
    for i in range(3):
        pos = ds[i].pos
        assert pos.dtype == torch.int64
        assert (pos % ds.patch_size == 0).all()
        assert torch.unique(pos, dim=0).size(0) == pos.size(0)
        key = pos[:, 1] * 10**9 + pos[:, 0]  # row-major scan order
        assert (key[1:] > key[:-1]).all()


@pytest.mark.parametrize("dist", ["uniform", "loguniform"])
def test_sizes_respect_range(dist):
    ds = SyntheticBags(num_bags=30, num_features=2, seed=0, min_instances=10, max_instances=90,
                       size_distribution=dist)
    sizes = ds.bag_sizes()
    assert int(sizes.min()) >= 10 and int(sizes.max()) <= 90
    assert [ds[i].num_nodes for i in range(5)] == sizes[:5].tolist()
    one = SyntheticBags(num_bags=2, num_features=2, min_instances=1, max_instances=1)
    assert one[0].num_nodes == 1 and one[0].edge_index.size(1) == 0


def test_signal_shifts_tumour_along_direction():
    kw = dict(num_bags=8, num_features=16, seed=0, pos_fraction=1.0, min_instances=400, max_instances=400)
    for signal in (0.0, 2.0):
        ds = SyntheticBags(signal=signal, **kw)
        proj_t, proj_n = [], []
        for i in range(len(ds)):
            bag = ds[i]
            p = bag.x @ ds.direction
            proj_t.append(p[bag.y_inst == 1])
            proj_n.append(p[bag.y_inst == 0])
        gap = torch.cat(proj_t).mean() - torch.cat(proj_n).mean()
        assert abs(float(gap) - signal) < 0.35, (signal, float(gap))


def test_spatial_noise_is_correlated_between_neighbours():
    def neighbour_corr(spatial_noise, noise):
        ds = SyntheticBags(num_bags=2, num_features=8, seed=0, signal=0.0, noise=noise,
                           spatial_noise=spatial_noise, min_instances=500, max_instances=500)
        bag = ds[0]
        a, b = bag.x[bag.edge_index[0]].flatten(), bag.x[bag.edge_index[1]].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    assert neighbour_corr(1.0, 0.0) > 0.7
    assert abs(neighbour_corr(0.0, 1.0)) < 0.1


def test_pyg_dataloader_slicing_and_batching():
    ds = SyntheticBags(num_bags=10, num_features=4, seed=0, min_instances=5, max_instances=40)
    sub = ds[2:5]
    assert len(sub) == 3
    _assert_same_bag(sub[1], ds[3])
    assert torch.equal(sub.labels, ds.labels[2:5])
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch.num_graphs == 4 and batch.y.shape == (4,)
    ref = Batch.from_data_list([ds[i] for i in range(4)])
    assert torch.equal(batch.edge_index, ref.edge_index)
    # block-diagonal: no edge crosses bags
    assert torch.equal(batch.batch[batch.edge_index[0]], batch.batch[batch.edge_index[1]])


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(num_bags=0), "num_bags"),
        (dict(min_instances=10, max_instances=5), "max_instances"),
        (dict(size_distribution="normal"), "size_distribution"),
        (dict(pos_fraction=1.5), "pos_fraction"),
        (dict(tumour_fraction=(0.5, 0.1)), "tumour_fraction"),
        (dict(signal=float("nan")), "signal"),
        (dict(num_features=0), "num_features"),
    ],
)
def test_bad_arguments(kw, name):
    with pytest.raises(ValueError, match=name):
        SyntheticBags(**kw)


def test_repr_names_hyperparameters():
    r = repr(SyntheticBags(num_bags=3, num_features=5, seed=2, signal=1.5))
    assert "num_features=5" in r and "seed=2" in r and "signal=1.5" in r


@pytest.mark.slow
def test_large_bag():
    ds = SyntheticBags(num_bags=2, num_features=8, min_instances=100_000, max_instances=100_000, in_memory=False)
    bag = ds[1]
    assert bag.num_nodes == 100_000
    # degree oracle from a hash set of occupied cells
    cells = (bag.pos // ds.patch_size).tolist()
    occupied = set(map(tuple, cells))
    deg = [sum((x + dx, y + dy) in occupied for dx in (-1, 0, 1) for dy in (-1, 0, 1)) - 1 for x, y in cells]
    assert torch.equal(torch.bincount(bag.edge_index[0], minlength=bag.num_nodes), torch.tensor(deg))
