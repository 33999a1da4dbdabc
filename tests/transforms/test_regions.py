import networkx as nx
import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader

from graphmil.transforms.regions import RegionPartition, global_region_index, grid_adjacency, kd_partition


def grid_graph(cells):
    """networkx 8-neighbour graph over integer grid cells (the oracle)."""
    cells = [tuple(int(v) for v in c) for c in cells]
    s = set(cells)
    g = nx.Graph()
    g.add_nodes_from(cells)
    for (i, j) in cells:
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                if (di or dj) and (i + di, j + dj) in s:
                    g.add_edge((i, j), (i + di, j + dj))
    return g


def blob(seed, h=30, w=40, holes=3):
    """An irregular tissue mask with holes (largest 8-connected component), as grid cells."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = w / 2, h / 2
    ang = np.arctan2(yy - cy, xx - cx)
    rad = np.hypot((xx - cx) / (w / 2), (yy - cy) / (h / 2))
    mask = rad < 0.8 + 0.15 * np.sin(3 * ang + rng.uniform(0, 6)) + 0.05 * np.cos(5 * ang)
    for _ in range(holes):
        hx, hy, hr = rng.uniform(0.3 * w, 0.7 * w), rng.uniform(0.3 * h, 0.7 * h), rng.uniform(1.5, 4)
        mask &= np.hypot(xx - hx, yy - hy) > hr
    g = grid_graph(np.argwhere(mask))
    comp = max(nx.connected_components(g), key=len)
    return np.array(sorted(comp))


def to_bag(cells, scale=256, d=4):
    pos = torch.tensor(cells[:, ::-1].copy() * scale, dtype=torch.long)  # (x, y) level-0 pixels
    return Data(x=torch.randn(len(cells), d), pos=pos)


def check_regions(cells, region, m):
    g = grid_graph(cells)
    lab = {tuple(int(v) for v in c): int(r) for c, r in zip(cells, region)}
    assert sorted(set(lab.values())) == list(range(m))
    for k in range(m):
        assert nx.is_connected(g.subgraph([v for v in g if lab[v] == k])), f"region {k} not connected"
    for k in range(m - 1):
        assert any(lab[b] == k + 1 for a in g if lab[a] == k for b in g[a]), f"regions {k}, {k+1} don't touch"


def test_kd_rectangle_equal_sizes_connected_touching():
    cells = np.argwhere(np.ones((12, 17), dtype=bool))
    data = RegionPartition(8)(to_bag(cells))
    assert data.num_regions == 8
    sizes = np.bincount(data.region.numpy())
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == len(cells)
    check_regions(cells, data.region.numpy(), 8)


@pytest.mark.parametrize("method,seed", [("kd", 0), ("kd", 1), ("kd", 2), ("kd", 5), ("kmeans", 0),
                                         ("grid", 0), ("grid", 1), ("grid", 2)])
def test_irregular_tissue_connected_and_touching(seed, method):
    cells = blob(seed)
    data = RegionPartition(8, method=method)(to_bag(cells))
    m = data.num_regions
    assert 1 < m <= 8
    check_regions(cells, data.region.numpy(), m)
    if method == "kd":
        sizes = np.bincount(data.region.numpy())
        n = len(cells)
        assert sizes.max() <= 1.5 * n / 8 and sizes.min() >= 0.5 * n / 8


def test_kd_without_repair_can_break_connectivity_and_repair_fixes_it():
    # the repair must be doing something on at least one irregular shape
    broken = 0
    for seed in range(6):
        cells = blob(seed)
        raw = RegionPartition(8, repair=False, order=False)(to_bag(cells)).region.numpy()
        g = grid_graph(cells)
        lab = {tuple(int(v) for v in c): int(r) for c, r in zip(cells, raw)}
        broken += sum(not nx.is_connected(g.subgraph([v for v in g if lab[v] == k])) for k in range(8))
    assert broken > 0


def test_small_bags_get_fewer_regions():
    cells = np.argwhere(np.ones((1, 5), dtype=bool))
    d = RegionPartition(8)(to_bag(cells))
    assert d.num_regions == 5 and sorted(d.region.tolist()) == [0, 1, 2, 3, 4]
    d = RegionPartition(8, min_region_size=3)(to_bag(np.argwhere(np.ones((2, 5), dtype=bool))))
    assert d.num_regions == 3 and np.bincount(d.region.numpy()).min() >= 3
    d = RegionPartition(8)(to_bag(np.zeros((1, 2), dtype=np.int64)))
    assert d.num_regions == 1 and d.region.tolist() == [0]


def test_kd_partition_batched_equals_per_bag():
    bags = [to_bag(blob(s, h=14 + s, w=18)) for s in range(3)] + [to_bag(np.zeros((1, 2), dtype=np.int64))]
    batch = Batch.from_data_list(bags)
    region, m = kd_partition(batch.pos, batch.batch, 8, len(bags))
    for b, bag in enumerate(bags):
        r1, m1 = kd_partition(bag.pos, None, 8)
        assert torch.equal(region[batch.batch == b], r1) and int(m[b]) == int(m1)
        sizes = torch.bincount(r1)
        assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 2


def test_batching_keeps_regions_of_bags_apart():
    bags = [RegionPartition(8)(to_bag(blob(s, h=12, w=16))) for s in range(3)]
    bags.append(RegionPartition(8)(to_bag(np.argwhere(np.ones((1, 3), dtype=bool)))))
    for batch in (Batch.from_data_list(bags), next(iter(DataLoader(bags, batch_size=4)))):
        region, total, region_batch = global_region_index(batch)
        assert total == sum(b.num_regions for b in bags)
        offset = 0
        for b, bag in enumerate(bags):
            sel = batch.batch == b
            assert torch.equal(region[sel], bag.region + offset)
            assert torch.equal(region_batch[region[sel]], torch.full((int(sel.sum()),), b))
            offset += bag.num_regions
        # no region id is shared by two bags
        owners = {}
        for r, b in zip(region.tolist(), batch.batch.tolist()):
            assert owners.setdefault(r, b) == b
    # a single bag, and a batch without num_regions (inferred from the ids)
    r, total, _ = global_region_index(bags[0])
    assert torch.equal(r, bags[0].region) and total == bags[0].num_regions
    batch = Batch.from_data_list(bags)
    del batch.num_regions
    assert torch.equal(global_region_index(batch)[0], global_region_index(Batch.from_data_list(bags))[0])


def test_grid_adjacency_matches_networkx():
    cells = blob(4, h=10, w=12)
    e = grid_adjacency(torch.tensor(cells[:, ::-1].copy() * 224))
    g = grid_graph(cells)
    idx = {tuple(int(v) for v in c): i for i, c in enumerate(cells)}
    want = {(idx[a], idx[b]) for a, b in g.edges} | {(idx[b], idx[a]) for a, b in g.edges}
    assert set(map(tuple, e.T.tolist())) == want and e.shape[1] == len(want)
    # scattered points (no common nearest-neighbour distance) are not a patch grid
    assert grid_adjacency(np.random.default_rng(0).random((50, 2)) * 1000) is None
    # a lattice with an isolated off-lattice patch (another contour's origin) still is one
    e = grid_adjacency(np.array([[0.0, 0.0], [1.0, 0.0], [2.5, 0.0]]))
    assert set(map(tuple, e.T.tolist())) == {(0, 1), (1, 0)}


def test_bad_input():
    with pytest.raises(ValueError, match="num_regions"):
        RegionPartition(0)
    with pytest.raises(ValueError, match="method"):
        RegionPartition(4, method="voronoi")
    with pytest.raises(ValueError, match="pos"):
        RegionPartition(4)(Data(x=torch.randn(3, 2)))
    with pytest.raises(ValueError, match="region"):
        global_region_index(Data(x=torch.randn(3, 2)))
    assert "method='kd'" in repr(RegionPartition())


# ----------------------------------------------------------------------------------------------
# CLAM: three tissue pieces on 256-px lattices whose origins are offset by 128 px
# ----------------------------------------------------------------------------------------------
def clam_three_pieces(seed=0, step=256):
    """Three ragged elliptic pieces, each on its own lattice; origins offset by (128, 128) and
    (128, 0) from the first (CLAM starts a lattice at every contour's bounding box)."""
    rng = np.random.default_rng(seed)
    origins = [(1000, 1000), (1000 + 22 * step + 128, 1000 + 128), (1000 + 128, 1000 + 16 * step)]
    out = []
    for o, (rx, ry) in zip(origins, [(9, 6), (6, 7), (8, 5)]):
        xx, yy = np.meshgrid(np.arange(2 * rx + 1), np.arange(2 * ry + 1), indexing="ij")
        inside = ((xx - rx) / (rx + 0.5)) ** 2 + ((yy - ry) / (ry + 0.5)) ** 2 <= 1.0
        inside &= rng.random(inside.shape) > 0.1
        out.append(np.stack([xx[inside], yy[inside]], 1) * step + np.array(o))
    return np.concatenate(out).astype(np.int64)


def oracle_graph(pos, radius):
    """networkx graph of the brute-force O(N^2) distance rule (the independent oracle)."""
    p = pos.astype(np.float64)
    d = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1))
    g = nx.Graph()
    g.add_nodes_from(range(len(p)))
    g.add_edges_from(zip(*np.nonzero(np.triu(d <= radius, 1))))
    return g


def test_grid_adjacency_on_clam_three_pieces_matches_bruteforce():
    pos = clam_three_pieces()
    assert min(np.diff(np.unique(pos[:, a])).min() for a in range(2)) == 128  # the old step guess
    g = oracle_graph(pos, 1.01 * np.sqrt(2) * 256)
    want = {(a, b) for a, b in g.edges} | {(b, a) for a, b in g.edges}
    e = grid_adjacency(pos)
    assert len(want) > 1000 and set(map(tuple, e.T.tolist())) == want and e.shape[1] == len(want)
    assert nx.number_connected_components(g) == 3


@pytest.mark.parametrize("num_regions", [4, 8])
def test_region_partition_on_clam_three_pieces_repairs_with_the_true_grid(num_regions):
    pos = clam_three_pieces(seed=num_regions)
    g = oracle_graph(pos, 1.01 * np.sqrt(2) * 256)
    data = RegionPartition(num_regions)(Data(x=torch.randn(len(pos), 2), pos=torch.from_numpy(pos)))
    region = data.region.numpy()
    m = data.num_regions
    assert sorted(set(region.tolist())) == list(range(m)) and m == num_regions
    # the repair's fixed point, checked on the oracle graph: every piece of a region other than its
    # largest has no grid edge to another region (else it would have moved there). With the old
    # per-axis step guess (128 px: no edges at all) the repair did nothing and this failed.
    for k in range(m):
        comps = sorted(nx.connected_components(g.subgraph(np.flatnonzero(region == k).tolist())), key=len)
        for comp in comps[:-1]:
            assert all(region[v] == k for u in comp for v in g[u]), f"region {k}: a stray piece touches another region"
    # a region spans at most the tissue pieces it needs: its pieces are pieces of the tissue
    for k in range(m):
        assert nx.number_connected_components(g.subgraph(np.flatnonzero(region == k).tolist())) <= 3


# ----------------------------------------------------------------------------------------------
# RegionPartition on a Batch, and its repr
# ----------------------------------------------------------------------------------------------
def test_region_partition_on_batch_equals_per_bag():
    bags = [to_bag(blob(s, h=12 + s, w=15)) for s in range(3)]
    bags.append(Data(x=torch.randn(len(clam_three_pieces()), 4), pos=torch.from_numpy(clam_three_pieces())))
    bags.append(to_bag(np.zeros((1, 2), dtype=np.int64)))
    scattered = torch.rand(30, 2) * 1000  # not a patch grid: the bag's own edges are used
    ring = torch.arange(30)
    bags.append(Data(x=torch.randn(30, 4), pos=scattered, edge_index=torch.stack([ring, ring.roll(1)])))
    for b in bags[:-1]:
        b.edge_index = torch.zeros(2, 0, dtype=torch.long)
    for t in (RegionPartition(6), RegionPartition(4, method="grid", order=False)):
        one_by_one = [t(b.clone()) for b in bags]
        ref = Batch.from_data_list(one_by_one)
        for batch in (Batch.from_data_list([b.clone() for b in bags]),
                      next(iter(DataLoader([b.clone() for b in bags], batch_size=len(bags))))):
            out = t(batch)
            assert torch.equal(out.region, ref.region)
            assert torch.equal(out.num_regions, ref.num_regions)
            assert torch.equal(global_region_index(out)[0], global_region_index(ref)[0])
            for part, single in zip(out.to_data_list(), one_by_one):
                assert torch.equal(part.region, single.region)
                assert int(part.num_regions) == single.num_regions


def test_region_partition_reprs_differ_when_parameters_differ():
    variants = [RegionPartition(), RegionPartition(4), RegionPartition(method="kmeans"), RegionPartition(min_region_size=3),
                RegionPartition(seed=1), RegionPartition(step=256), RegionPartition(repair=False),
                RegionPartition(order=False)]
    reprs = [repr(t) for t in variants]
    assert len(set(reprs)) == len(reprs), reprs
