"""graphmil.ops.geometry: grid step, lattice / k-NN / radius edges, per bag, against brute force."""

import math
import warnings

import numpy as np
import pytest
import torch

from graphmil.ops.geometry import (as_positions, grid_edges, infer_grid_step, knn_edges, lattice_edges,
                                   radius_edges)

R8 = 1.01 * math.sqrt(2)


# ----------------------------------------------------------------------------------------------
# independent oracles (numpy distance matrices, O(N^2))
# ----------------------------------------------------------------------------------------------
def oracle_radius(pos, radius, batch=None):
    """All ordered pairs i != j of one bag with distance <= radius, sorted by (row, col)."""
    p = np.asarray(pos, dtype=np.float64)
    d = np.sqrt(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1))
    adj = (d <= radius) & ~np.eye(len(p), dtype=bool)
    if batch is not None:
        b = np.asarray(batch)
        adj &= b[:, None] == b[None, :]
    return np.argwhere(adj).T  # row-major: sorted


def oracle_knn(pos, k, batch=None):
    """Symmetrised kNN with ties broken by index: sort each row by (distance, index)."""
    p = np.asarray(pos, dtype=np.float64)
    n = len(p)
    d = np.sqrt(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    if batch is not None:
        b = np.asarray(batch)
        d[b[:, None] != b[None, :]] = np.inf
    edges = set()
    for i in range(n):
        order = np.lexsort((np.arange(n), d[i]))
        for j in order[:k]:
            if np.isfinite(d[i, j]):
                edges |= {(i, int(j)), (int(j), i)}
    return np.array(sorted(edges), dtype=np.int64).reshape(-1, 2).T


def clam_three_pieces(touching=False, seed=0, step=256, return_piece=False):
    """Three tissue pieces, each on its own 256-px lattice, the origins offset by 128 px from each
    other (CLAM starts a lattice at every contour's bounding box)."""
    rng = np.random.default_rng(seed)
    pieces = []
    half = step // 2
    gap = 0 if touching else 3 * step  # touching: the pieces' border patches are half a step apart
    # piece A at (1000, 1000); B offset (128, 128) to the right of A; C offset (128, 0) below A
    radii = [(9, 6), (6, 7), (8, 5)]
    a_w, a_h = 2 * radii[0][0] + 1, 2 * radii[0][1] + 1
    origins = [(1000, 1000),
               (1000 + (a_w - 1) * step + half + step + gap, 1000 + half),
               (1000 + half, 1000 + (a_h - 1) * step + step + gap)]
    for o, (rx, ry) in zip(origins, radii):
        xx, yy = np.meshgrid(np.arange(2 * rx + 1), np.arange(2 * ry + 1), indexing="ij")
        inside = ((xx - rx) / (rx + 0.5)) ** 2 + ((yy - ry) / (ry + 0.5)) ** 2 <= 1.0
        inside &= rng.random(inside.shape) > 0.1  # ragged tissue with holes
        cells = np.stack([xx[inside], yy[inside]], 1)
        pieces.append(cells * step + np.array(o))
    pos = np.concatenate(pieces).astype(np.int64)
    if return_piece:
        return pos, np.repeat(np.arange(3), [len(q) for q in pieces])
    return pos


def per_axis_min_gap_step(p):
    """The old regions.grid_adjacency rule (smallest coordinate gap per axis)."""
    return [float(np.diff(np.unique(p[:, a])).min()) for a in range(2)]


# ----------------------------------------------------------------------------------------------
# the three-piece CLAM lattice
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("touching", [False, True])
@pytest.mark.parametrize("connectivity", [4, 8])
def test_clam_three_pieces_offset_by_half_a_step(touching, connectivity):
    pos, piece = clam_three_pieces(touching, return_piece=True)
    # pairwise origin offsets are 128 px: the smallest coordinate gap is 128, not the step
    assert per_axis_min_gap_step(pos) == [128.0, 128.0]
    assert infer_grid_step(pos) == 256.0
    ei, step = grid_edges(torch.from_numpy(pos), connectivity=connectivity)
    assert step == 256.0
    ref = oracle_radius(pos, 256 * (R8 if connectivity == 8 else 1.01))
    assert ref.shape[1] > 1000
    assert np.array_equal(ei.numpy(), ref)
    cross = int((piece[ref[0]] != piece[ref[1]]).sum())
    assert (cross > 0) == (touching and connectivity == 8)  # touching pieces: linked across, by distance


def test_clam_three_pieces_lattice_fast_path_declines_and_tree_is_used():
    pos = clam_three_pieces()
    assert lattice_edges(pos, 256.0) is None  # three origins: not one lattice
    one = pos[: 100]  # the first piece alone is one lattice
    fast = lattice_edges(one, 256.0)
    assert fast is not None and np.array_equal(fast.numpy(), oracle_radius(one, 256 * R8))


# ----------------------------------------------------------------------------------------------
# grid step
# ----------------------------------------------------------------------------------------------
def test_infer_grid_step_per_bag_and_support():
    rng = np.random.default_rng(1)
    lat = np.argwhere(rng.random((12, 9)) < 0.7)
    bags = [lat * 512, lat[:40] * 256 + 7, np.array([[5, 5]]), rng.random((30, 2)) * 1e4, clam_three_pieces()]
    pos = np.concatenate(bags)
    batch = np.repeat(np.arange(len(bags)), [len(b) for b in bags])
    steps, support = infer_grid_step(pos, batch=torch.from_numpy(batch), return_support=True)
    for i, b in enumerate(bags):
        s, sup = infer_grid_step(b, return_support=True)
        if s is None:
            assert math.isnan(steps[i]) and math.isnan(support[i])
        else:
            assert steps[i].item() == s and support[i].item() == pytest.approx(sup)
    assert steps[0] == 512 and steps[1] == 256 and steps[4] == 256
    assert support[0] > 0.9 and support[4] > 0.9 and support[3] < 0.2  # scattered points
    # brute-force mode of the nearest-neighbour distance
    p = bags[1].astype(float)
    d = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    vals, counts = np.unique(np.round(d.min(1), 6), return_counts=True)
    assert steps[1] == vals[np.argmax(counts)]
    # an empty bag in the middle
    st = infer_grid_step(pos[:10], batch=np.array([0] * 5 + [2] * 5))
    assert st.shape == (3,) and math.isnan(st[1])


def test_step_warning_names_the_bags_that_disagree():
    lat = np.argwhere(np.ones((5, 4), dtype=bool))
    pos = np.concatenate([lat * 512, lat * 256])
    batch = np.repeat([0, 1], len(lat))
    with pytest.warns(UserWarning, match=r"grid step of 1 bag\(s\) \(e.g. bag 0\) 256 .*disagrees with the coordinate spacing"):
        ei, steps = grid_edges(pos, step=[256.0, 256.0], batch=batch)
    assert steps.tolist() == [512.0, 256.0]
    ref = np.concatenate([oracle_radius(lat * 512, R8 * 512), oracle_radius(lat * 256, R8 * 256) + len(lat)], 1)
    assert np.array_equal(ei.numpy(), ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grid_edges(pos, step=[512.0, 256.0], batch=batch)
        grid_edges(pos, step=256.0, batch=batch, check_step=False)


# ----------------------------------------------------------------------------------------------
# batched == one by one
# ----------------------------------------------------------------------------------------------
def _bags():
    rng = np.random.default_rng(3)
    lat = np.argwhere(rng.random((14, 11)) < 0.7)
    return [
        lat * 512,                                        # 40x scan: step 512
        lat[: 90] * 256 + 13,                             # 20x: step 256, overlaps the first in px
        clam_three_pieces(seed=1),                        # several lattice origins
        np.array([[0, 0]]),                               # one instance
        np.array([[0, 0], [0, 0], [256, 0], [512, 0]]),   # duplicate coordinates
        rng.random((40, 2)) * 3000,                       # scattered points
        np.argwhere(np.ones((3, 3), dtype=bool)) * 100,   # tiny full lattice
    ]


def _offset_concat(parts, sizes):
    off = np.concatenate([[0], np.cumsum(sizes)])
    return np.concatenate([p + off[i] for i, p in enumerate(parts)], 1)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_grid_edges_batched_equals_per_bag(connectivity):
    bags = _bags()
    sizes = [len(b) for b in bags]
    pos = np.concatenate(bags)
    batch = np.repeat(np.arange(len(bags)), sizes)
    ei, steps = grid_edges(pos, connectivity=connectivity, batch=batch)
    parts, ref_steps = [], []
    for b in bags:
        e, s = grid_edges(b, connectivity=connectivity)
        parts.append(e.numpy())
        ref_steps.append(np.nan if s is None else s)
        if s is not None:  # the per-bag builder itself equals the brute-force oracle
            assert np.array_equal(e.numpy(), oracle_radius(b, s * (R8 if connectivity == 8 else 1.01)))
    assert np.array_equal(ei.numpy(), _offset_concat(parts, sizes))
    np.testing.assert_array_equal(steps.numpy(), np.array(ref_steps))
    assert (batch[ei[0]] == batch[ei[1]]).all()
    # the bags overlap in level-0 px: a batch-blind build joins bags
    blind, _ = grid_edges(pos, step=256.0, connectivity=connectivity, check_step=False)
    assert (batch[blind[0]] != batch[blind[1]]).sum() > 0


def test_grid_edges_unsorted_batch_vector():
    bags = _bags()
    pos = np.concatenate(bags)
    batch = np.repeat(np.arange(len(bags)), [len(b) for b in bags])
    perm = np.random.default_rng(0).permutation(len(pos))
    ei, steps = grid_edges(pos, batch=batch)
    ep, sp = grid_edges(pos[perm], batch=batch[perm])
    inv = np.argsort(perm)  # node i of the sorted input is node inv[i] of the permuted one
    key = lambda e: set(map(tuple, e.T.tolist()))  # noqa: E731
    assert key(ep.numpy()) == {(int(inv[a]), int(inv[b])) for a, b in ei.numpy().T}
    np.testing.assert_array_equal(sp.numpy(), steps.numpy())
    e = ep.numpy()
    assert (np.diff(e[0] * len(pos) + e[1]) > 0).all()


def test_knn_edges_ties_broken_by_index_and_batched():
    bags = _bags()
    sizes = [len(b) for b in bags]
    pos = np.concatenate(bags)
    batch = np.repeat(np.arange(len(bags)), sizes)
    for k in (1, 3, 6, 10):
        parts = []
        for b in bags:
            e = knn_edges(b, k).numpy()
            assert np.array_equal(e, oracle_knn(b, k)), k  # lattices: many ties
            parts.append(e)
        ei = knn_edges(pos, k, batch=torch.from_numpy(batch)).numpy()
        assert np.array_equal(ei, _offset_concat(parts, sizes))
        assert np.array_equal(ei, oracle_knn(pos, k, batch))
    with pytest.raises(ValueError, match="'k'"):
        knn_edges(pos, 0)


def test_radius_edges_batched_equals_per_bag_and_oracle():
    bags = _bags()
    sizes = [len(b) for b in bags]
    pos = np.concatenate(bags)
    batch = np.repeat(np.arange(len(bags)), sizes)
    for r in (100.0, 300.0, 600.0):
        ei = radius_edges(pos, r, batch=batch).numpy()
        assert np.array_equal(ei, _offset_concat([radius_edges(b, r).numpy() for b in bags], sizes))
        assert np.array_equal(ei, oracle_radius(pos, r, batch))
    with pytest.raises(ValueError, match="'r'"):
        radius_edges(pos, float("inf"))


def test_input_validation():
    with pytest.raises(ValueError, match=r"'pos' must be \[N, 2\]"):
        as_positions(np.zeros(5))
    with pytest.raises(ValueError, match="numeric"):
        as_positions(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="one entry per instance"):
        grid_edges(np.zeros((3, 2)), batch=[0, 1])
    with pytest.raises(ValueError, match="'num_bags'"):
        grid_edges(np.zeros((3, 2)), batch=[0, 1, 2], num_bags=2)
    with pytest.raises(ValueError, match="one value per bag"):
        grid_edges(np.zeros((3, 2)), step=[1.0, 2.0, 3.0], batch=[0, 0, 1])
    with pytest.raises(ValueError, match="connectivity"):
        grid_edges(np.zeros((3, 2)), connectivity=6)
    with pytest.raises(ValueError, match="single bag"):
        from scipy.spatial import cKDTree

        infer_grid_step(np.zeros((3, 2)), tree=cKDTree(np.zeros((3, 2))), batch=[0, 1, 1])
