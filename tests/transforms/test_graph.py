import math
import warnings

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

from graphmil import make_bag
from graphmil.io import read_bag, write_synthetic_folder
from graphmil.transforms.graph import (
    FeatureDistanceWeights,
    GridGraph,
    KNNGraph,
    RadiusGraph,
    grid_edges,
    infer_grid_step,
)


def oracle_edges(pos, radius):
    """Brute-force O(N^2) edge set: all ordered pairs i != j with distance <= radius."""
    p = np.asarray(pos, dtype=np.float64)
    d = np.sqrt(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1))
    adj = (d <= radius) & ~np.eye(len(p), dtype=bool)
    return set(zip(*np.nonzero(adj)))


def edge_set(edge_index):
    return set(map(tuple, edge_index.t().tolist()))


def check_canonical(edge_index):
    ei = edge_index.numpy()
    assert (ei[0] != ei[1]).all(), "self-loop"
    key = ei[0] * (ei.max() + 1 if ei.size else 1) + ei[1]
    assert (np.diff(key) > 0).all(), "edge_index not sorted/unique"
    assert edge_set(edge_index) == {(j, i) for i, j in edge_set(edge_index)}, "not symmetric"


@pytest.mark.parametrize("connectivity", [4, 8])
def test_trident_40x_folder_matches_oracle(tmp_path, connectivity):
    f = write_synthetic_folder(tmp_path, layout="trident", num_slides=2, magnification=40, target_magnification=20, patch_size=256)
    assert f.patch_size_level0 == 512 and f.step_level0 == 512
    for sid in f.slide_ids:
        bag = GridGraph(connectivity)(read_bag(f.feature_file(sid)))
        assert bag.step_level0 == 512
        factor = 1.01 * (math.sqrt(2) if connectivity == 8 else 1.0)
        expected = oracle_edges(bag.pos.numpy(), factor * 512)
        assert len(expected) > 0  # the classic 40x bug (dividing by patch_size) gives zero edges
        assert edge_set(bag.edge_index) == expected
        check_canonical(bag.edge_index)


@pytest.mark.parametrize("layout", ["clam_h5", "clam_pt"])
def test_clam_two_contours_different_origins(tmp_path, layout):
    f = write_synthetic_folder(tmp_path, layout=layout, num_slides=2, num_contours=2)
    sid = f.slide_ids[0]
    (o1, o2) = f.contour_origins[sid]
    # origins are not on a common lattice: integer division by the step would misalign contours
    assert (o1[0] - o2[0]) % f.step_level0 != 0 or (o1[1] - o2[1]) % f.step_level0 != 0
    bag = read_bag(f.feature_file(sid))
    for conn, factor in ((8, 1.01 * math.sqrt(2)), (4, 1.01)):
        out = GridGraph(conn)(bag.clone())
        assert edge_set(out.edge_index) == oracle_edges(bag.pos.numpy(), factor * f.step_level0)
    # 4-neighbourhood is a strict subset of the 8-neighbourhood
    e4 = edge_set(GridGraph(4)(bag.clone()).edge_index)
    e8 = edge_set(GridGraph(8)(bag.clone()).edge_index)
    assert e4 < e8


@pytest.mark.parametrize("overlap,step", [(64, 384), (128, 256)])
def test_overlapping_grid(tmp_path, overlap, step):
    f = write_synthetic_folder(tmp_path, layout="trident", num_slides=1, overlap=overlap)
    assert f.step_level0 == 512 - 2 * overlap == step  # overlap px at 20x on a 40x scan
    bag = read_bag(f.feature_file(f.slide_ids[0]))
    assert bag.step_level0 == pytest.approx(step)
    for conn, factor in ((8, 1.01 * math.sqrt(2)), (4, 1.01)):
        out = GridGraph(conn)(bag.clone())
        assert edge_set(out.edge_index) == oracle_edges(bag.pos.numpy(), factor * step)
    if overlap == 128:  # the patch size (512) as step would link patches two steps apart
        assert edge_set(out.edge_index) != oracle_edges(bag.pos.numpy(), 1.01 * 512)


def test_step_inferred_without_attributes():
    rng = np.random.default_rng(0)
    cells = np.array([(i, j) for i in range(6) for j in range(5) if rng.random() > 0.2])
    pos = torch.from_numpy(cells * 300 + 17)
    bag = GridGraph()(make_bag(torch.randn(len(pos), 3), pos=pos))
    assert infer_grid_step(pos) == 300
    assert edge_set(bag.edge_index) == oracle_edges(pos.numpy(), 1.01 * math.sqrt(2) * 300)


def test_wrong_step_attribute_trusts_coordinates():
    cells = np.array([(i, j) for i in range(5) for j in range(4)])
    pos = torch.from_numpy(cells * 512)
    bag = make_bag(torch.randn(len(pos), 3), pos=pos, step_level0=256.0)  # e.g. patch_size at 20x
    with pytest.warns(UserWarning, match="disagrees with the coordinate spacing"):
        out = GridGraph()(bag)
    assert edge_set(out.edge_index) == oracle_edges(pos.numpy(), 1.01 * math.sqrt(2) * 512)


def test_explicit_step_and_consistent_attribute_no_warning():
    pos = torch.tensor([[0, 0], [100, 0], [200, 0], [0, 100]])
    bag = make_bag(torch.randn(4, 2), pos=pos, step_level0=100.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = GridGraph(4)(bag)
    assert edge_set(out.edge_index) == {(0, 1), (1, 0), (1, 2), (2, 1), (0, 3), (3, 0)}
    # forcing a larger step connects 2-step neighbours
    out = GridGraph(4, step=200)(bag.clone())
    assert edge_set(out.edge_index) == oracle_edges(pos.numpy(), 202)


def test_single_instance_and_grid_edges_function():
    bag = GridGraph()(make_bag(torch.randn(1, 4), pos=torch.tensor([[5, 5]])))
    assert bag.edge_index.shape == (2, 0) and bag.edge_index.dtype == torch.long
    ei, step = grid_edges(np.array([[0, 0], [10, 0]]), connectivity=4)
    assert step == 10 and edge_set(ei) == {(0, 1), (1, 0)}
    with pytest.raises(ValueError, match="connectivity"):
        GridGraph(6)
    with pytest.raises(ValueError, match="no 'pos'"):
        GridGraph()(make_bag(torch.randn(3, 2)))


def test_batching_is_block_diagonal(tmp_path):
    f = write_synthetic_folder(tmp_path, layout="trident", num_slides=3)
    bags = [GridGraph()(read_bag(f.feature_file(s))) for s in f.slide_ids]
    batch = Batch.from_data_list(bags)
    row, col = batch.edge_index
    assert torch.equal(batch.batch[row], batch.batch[col])  # no cross-bag edge
    # positions of different bags overlap in level-0 px: a graph on the batch's pos would mix bags,
    # the block-diagonal one equals the per-bag graphs shifted by ptr
    expected = torch.cat([b.edge_index + batch.ptr[i] for i, b in enumerate(bags)], dim=1)
    assert torch.equal(batch.edge_index, expected)


def test_knn_graph_matches_bruteforce():
    pos = torch.rand(40, 2) * 100
    k = 3
    out = KNNGraph(k)(make_bag(torch.randn(40, 2), pos=pos))
    p = pos.double().numpy()
    d = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1)[:, :k]
    expected = {(i, int(j)) for i in range(40) for j in nn[i]}
    expected |= {(j, i) for i, j in expected}
    assert edge_set(out.edge_index) == expected
    check_canonical(out.edge_index)
    assert KNNGraph(5)(make_bag(torch.randn(3, 2), pos=torch.rand(3, 2))).edge_index.size(1) == 6


def test_radius_graph_matches_bruteforce():
    pos = torch.rand(50, 2) * 10
    out = RadiusGraph(2.0)(make_bag(torch.randn(50, 2), pos=pos))
    assert edge_set(out.edge_index) == oracle_edges(pos.numpy(), 2.0)
    check_canonical(out.edge_index)
    with pytest.raises(ValueError, match="'r'"):
        RadiusGraph(-1)


def test_feature_distance_weights_formula():
    pos = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]])
    x = torch.randn(4, 5)
    bag = FeatureDistanceWeights(chunk_size=3)(GridGraph()(make_bag(x, pos=pos)))
    for e, (i, j) in enumerate(bag.edge_index.t().tolist()):
        expected = math.exp(-math.sqrt(float(((x[i] - x[j]) ** 2).sum())) / 5)
        assert bag.edge_weight[e].item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="edge_index"):
        FeatureDistanceWeights()(make_bag(x, pos=pos))


def test_reprs():
    assert repr(GridGraph(4)) == "GridGraph(connectivity=4, step=None)"
    assert repr(GridGraph(8, step=512)) == "GridGraph(connectivity=8, step=512)"
    assert repr(KNNGraph(6)) == "KNNGraph(k=6)"
    assert repr(RadiusGraph(2.5)) == "RadiusGraph(r=2.5)"
    assert repr(FeatureDistanceWeights()) == "FeatureDistanceWeights()"


def test_reprs_differ_when_parameters_differ():
    # reprs are dataset cache keys: every parameter that can change the output must show
    groups = [
        [GridGraph(4), GridGraph(8), GridGraph(8, step=256), GridGraph(8, step=512), GridGraph(4, step=256)],
        [KNNGraph(3), KNNGraph(6)],
        [RadiusGraph(1.0), RadiusGraph(2.5)],
    ]
    for group in groups:
        reprs = [repr(t) for t in group]
        assert len(set(reprs)) == len(reprs), reprs


def test_feature_distance_weights_chunk_size_cannot_change_the_output():
    # the one parameter left out of FeatureDistanceWeights' repr: check the claim of its comment
    bag = GridGraph()(make_bag(torch.randn(60, 7), pos=torch.stack([torch.arange(60) % 8, torch.arange(60) // 8], 1)))
    ref = FeatureDistanceWeights()(bag.clone()).edge_weight
    for chunk in (1, 5, 64, 10**6):
        assert torch.equal(FeatureDistanceWeights(chunk_size=chunk)(bag.clone()).edge_weight, ref)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_lattice_fast_path_equals_brute_force_on_random_lattices(connectivity):
    # one-origin lattices (TRIDENT, synthetic) take the dense-grid lookup; it must equal the
    # distance rule exactly, whatever the step, origin and density
    from graphmil.ops.geometry import lattice_edges

    rng = np.random.default_rng(connectivity)
    for _ in range(12):
        side = int(rng.integers(2, 30))
        step = float(rng.choice([1.0, 37.5, 256.0, 448.0, 512.0]))
        g = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)
        g = g[rng.random(len(g)) < rng.uniform(0.2, 1.0)]
        if len(g) < 2:
            continue
        p = g * step + rng.integers(0, 1000, 2)
        fast = lattice_edges(p.astype(np.float64), step, connectivity)
        assert fast is not None
        ei, s = grid_edges(torch.from_numpy(p), step=step, connectivity=connectivity)
        radius = 1.01 * step * (np.sqrt(2) if connectivity == 8 else 1.0)
        d = np.sqrt(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1))
        ref = np.argwhere((d <= radius) & ~np.eye(len(p), dtype=bool)).T  # row-major: sorted
        assert np.array_equal(ei.numpy(), ref) and np.array_equal(fast.numpy(), ref)


def test_lattice_fast_path_declines_duplicates_and_off_lattice_points():
    from graphmil.ops.geometry import lattice_edges

    p = np.array([[0, 0], [512, 0], [512, 0], [1024, 0]], dtype=np.float64)
    assert lattice_edges(p, 512.0, 8) is None  # duplicate coordinates: the k-d tree handles them
    q = np.array([[0, 0], [512, 0], [700, 300]], dtype=np.float64)
    assert lattice_edges(q, 512.0, 8) is None  # a second lattice origin
    # the k-d tree path still gives the distance rule on both
    for pts in (p, q):
        assert edge_set(grid_edges(pts, step=512.0, check_step=False)[0]) == oracle_edges(pts, 1.01 * math.sqrt(2) * 512)


# ----------------------------------------------------------------------------------------------
# transforms on a Batch: edges per bag, equal to transforming the bags one by one
# ----------------------------------------------------------------------------------------------
def _mixed_bags():
    """Bags that overlap in level-0 px, with different steps (magnifications), CLAM-like several
    lattice origins, one instance, duplicates, and old edges/weights to be replaced."""
    rng = np.random.default_rng(5)
    lat = np.argwhere(rng.random((13, 10)) < 0.7)
    clam = np.concatenate([np.argwhere(np.ones((6, 5), dtype=bool)) * 256,
                           np.argwhere(np.ones((4, 4), dtype=bool)) * 256 + np.array([128 + 8 * 256, 128])])
    specs = [(lat * 512, 512.0), (lat[:70] * 256 + 40, 256.0), (clam, 256.0), (np.array([[3, 3]]), 256.0),
             (np.array([[0, 0], [0, 0], [256, 0], [256, 256]]), 256.0), (lat[:50] * 448, 448.0)]
    bags = []
    for i, (p, step) in enumerate(specs):
        n = len(p)
        ei = torch.stack([torch.arange(n), torch.arange(n).roll(1)]) if n > 1 else torch.zeros(2, 0, dtype=torch.long)
        bags.append(make_bag(torch.randn(n, 3), pos=torch.from_numpy(p), y=i % 2, step_level0=step,
                             edge_index=ei, edge_weight=torch.rand(ei.size(1))))
    return bags


@pytest.mark.parametrize("transform", [GridGraph(8), GridGraph(4), GridGraph(8, step=256), KNNGraph(1), KNNGraph(6),
                                       RadiusGraph(300.0), RadiusGraph(800.0)], ids=repr)
def test_transform_on_batch_equals_per_bag(transform):
    from torch_geometric.loader import DataLoader

    bags = _mixed_bags()
    one_by_one = [transform(b.clone()) for b in bags]
    ref = Batch.from_data_list(one_by_one)
    for batch in (Batch.from_data_list([b.clone() for b in bags]),
                  next(iter(DataLoader([b.clone() for b in bags], batch_size=len(bags))))):
        out = transform(batch)
        assert torch.equal(out.edge_index, ref.edge_index)
        row, col = out.edge_index
        assert int((out.batch[row] != out.batch[col]).sum()) == 0  # no cross-bag edge
        assert "edge_weight" not in out
        check_canonical(out.edge_index)
        # the slicing tables follow: to_data_list gives back every bag's own graph
        for part, single in zip(out.to_data_list(), one_by_one):
            assert torch.equal(part.edge_index, single.edge_index)
            assert "edge_weight" not in part
            assert torch.equal(part.pos, single.pos)


def test_batch_blind_build_would_join_bags():
    # the oracle above can fail: the same transform on the concatenated positions without the
    # bag index links bags (their coordinates overlap)
    bags = _mixed_bags()
    batch = Batch.from_data_list(bags)
    for transform in (GridGraph(8, step=256), KNNGraph(6), RadiusGraph(800.0)):
        blind = transform(make_bag(batch.x, pos=batch.pos))
        row, col = blind.edge_index
        assert int((batch.batch[row] != batch.batch[col]).sum()) > 0


def test_grid_graph_on_batch_infers_every_bags_step():
    # no step attribute: bags at 512 and 256 px get their own step (a batch-wide step would give
    # the 512-px bag no edges, or link 2-step neighbours of the 256-px bag)
    rng = np.random.default_rng(2)
    lat = np.argwhere(rng.random((9, 9)) < 0.8)
    bags = [make_bag(torch.randn(len(lat), 2), pos=torch.from_numpy(lat * s)) for s in (512, 256)]
    out = GridGraph()(Batch.from_data_list(bags))
    ref = [oracle_edges(lat * s, 1.01 * math.sqrt(2) * s) for s in (512, 256)]
    got = [edge_set(p.edge_index) for p in out.to_data_list()]
    assert got == ref and all(len(r) > 0 for r in ref)


def test_grid_graph_batch_warns_for_a_wrong_step_attribute():
    lat = np.argwhere(np.ones((4, 5), dtype=bool))
    bags = [make_bag(torch.randn(20, 2), pos=torch.from_numpy(lat * 512), step_level0=256.0),
            make_bag(torch.randn(20, 2), pos=torch.from_numpy(lat * 256), step_level0=256.0)]
    with pytest.warns(UserWarning, match="disagrees with the coordinate spacing"):
        out = GridGraph()(Batch.from_data_list(bags))
    assert [edge_set(p.edge_index) for p in out.to_data_list()] == [
        oracle_edges(lat * 512, 1.01 * math.sqrt(2) * 512), oracle_edges(lat * 256, 1.01 * math.sqrt(2) * 256)]


def test_feature_distance_weights_on_batch():
    bags = [GridGraph()(b) for b in _mixed_bags()]
    t = FeatureDistanceWeights()
    out = t(Batch.from_data_list([b.clone() for b in bags]))
    ref = Batch.from_data_list([t(b.clone()) for b in bags])
    assert torch.equal(out.edge_weight, ref.edge_weight)
    for part, single in zip(out.to_data_list(), bags):
        assert torch.equal(part.edge_weight, t(single.clone()).edge_weight)
