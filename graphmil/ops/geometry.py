r"""Geometry of patch bags: the grid step and the lattice, k-NN and radius neighbour edges.

The one implementation of each, on the floor under :mod:`graphmil.nn` and
:mod:`graphmil.transforms` (the transforms :class:`~graphmil.transforms.GridGraph`,
:class:`~graphmil.transforms.KNNGraph`, :class:`~graphmil.transforms.RadiusGraph` and
:class:`~graphmil.transforms.RegionPartition`, :class:`~graphmil.datasets.SyntheticBags` and the
benchmarks call these functions).

Every builder takes an optional bag index ``batch [N]`` and then works **per bag**: no edge joins
two bags and the grid step is inferred for every bag on its own (bags may differ in
magnification), with the result equal to building each bag alone and concatenating (node ids
offset, as :meth:`torch_geometric.data.Batch.from_data_list` does). Bags are kept apart in one
:class:`scipy.spatial.cKDTree` by an extra coordinate :math:`b \cdot g` with a gap :math:`g` larger
than every within-bag distance and query radius, so a batch costs one tree, not one per bag.

Graphs are built by distance in the units of ``pos`` (level-0 pixels for bags read from
CLAM/TRIDENT folders), symmetric, without self-loops, with ``edge_index`` sorted by
``(row, col)``; everything is vectorised with numpy and :class:`~scipy.spatial.cKDTree` (no
per-patch Python loop, no compiled extension such as ``torch-cluster``).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

__all__ = [
    "as_positions",
    "infer_grid_step",
    "grid_edges",
    "lattice_edges",
    "knn_edges",
    "radius_edges",
]

#: relative tolerance on the neighbour radius (``1.01 * step`` / ``1.01 * sqrt(2) * step``)
RADIUS_TOLERANCE = 1.01
#: relative difference above which a step attribute and the coordinate spacing "disagree"
STEP_RTOL = 0.01
#: at most this many (evenly strided) patches per bag are queried to infer the step
STEP_SAMPLES = 8192
#: a dense lattice index is used when the bounding grid has at most this many cells per patch
LATTICE_CELLS_PER_PATCH = 64
#: largest rounding error (in grid steps) for a coordinate to count as on the lattice
LATTICE_ATOL = 1e-3

ArrayLike = Union[Tensor, np.ndarray, Sequence]


# ----------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------
def as_positions(pos: ArrayLike) -> np.ndarray:
    r"""Coordinates as a C-contiguous ``float64`` numpy array, validated.

    Args:
        pos: coordinates ``[N, d]`` with ``d >= 2`` (tensor, array or nested sequence; integer or
            floating point).

    Returns:
        ``np.ndarray [N, d]`` of ``float64`` (a tensor is detached and moved to the CPU).

    Raises:
        ValueError: when ``pos`` is not 2-D with at least two columns, or not numeric.

    Shapes:
        - **input:** ``pos [N, d]``
        - **output:** ``[N, d]``
    """
    if isinstance(pos, Tensor):
        pos = pos.detach().cpu().numpy()
    pos = np.asarray(pos)
    if pos.ndim != 2 or pos.shape[1] < 2:
        raise ValueError(f"'pos' must be [N, 2] (or [N, d]), got shape {tuple(pos.shape)}")
    if pos.dtype.kind not in "iuf":
        raise ValueError(f"'pos' must be numeric, got dtype {pos.dtype}")
    return np.ascontiguousarray(pos, dtype=np.float64)


def _as_batch(batch, n: int, num_bags: Optional[int]) -> Tuple[Optional[np.ndarray], int]:
    """``(bag index as int64 numpy [N] or None, number of bags)``; ``None`` = one bag."""
    if batch is None:
        return None, 1
    if isinstance(batch, Tensor):
        batch = batch.detach().cpu().numpy()
    b = np.asarray(batch).reshape(-1)
    if b.size != n:
        raise ValueError(f"'batch' must have one entry per instance ({n}), got {b.size}")
    if b.size and b.dtype.kind not in "iu":
        raise ValueError(f"'batch' must be an integer bag index, got dtype {b.dtype}")
    b = b.astype(np.int64, copy=False)
    if n and b.min() < 0:
        raise ValueError("'batch' must be non-negative")
    big = int(b.max()) + 1 if n else 0
    num = big if num_bags is None else int(num_bags)
    if num < big:
        raise ValueError(f"'num_bags' ({num}) is smaller than the bag index allows ({big})")
    return b, num


def _tree(p: np.ndarray) -> cKDTree:
    # midpoint splits build ~3x faster than the balanced median tree and query as fast on lattices
    return cKDTree(p, balanced_tree=False, compact_nodes=False)


def _space(p: np.ndarray, b: Optional[np.ndarray], num_bags: int, pad: float = 0.0):
    r"""``(points, tree, diameter)``: ``p`` with bags pulled apart along an extra coordinate.

    Bag :math:`b` gets the extra coordinate :math:`b\,g` with
    :math:`g = 2(\operatorname{diam} + \text{pad}) + 1`, so any two points of different bags are
    farther apart than any two points of one bag and than ``pad``; within a bag the extra
    coordinates are equal, so distances are bit-identical to those of the bag alone.
    """
    diam = float(np.linalg.norm(p.max(axis=0) - p.min(axis=0))) if p.shape[0] else 0.0
    if b is None or num_bags <= 1 or p.shape[0] == 0 or b.min() == b.max():
        pts = p
    else:
        gap = 2.0 * (diam + float(pad)) + 1.0
        pts = np.column_stack([p, b.astype(np.float64) * gap])
    return pts, _tree(pts), diam


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """Sorted unique values of a 1-D array (sort + diff; ``np.unique`` is much slower on big int arrays)."""
    a = np.sort(a, kind="stable" if a.dtype.kind == "f" else None)
    if a.size == 0:
        return a
    keep = np.empty(a.size, dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def _empty_edges() -> Tensor:
    return torch.empty(2, 0, dtype=torch.long)


def _pack_sort(rows: np.ndarray, cols: np.ndarray, num_nodes: int, dedupe: bool) -> Tensor:
    """Directed edges -> ``[2, E]`` sorted by ``(row, col)`` (self-loops and duplicates dropped
    when ``dedupe``)."""
    if rows.size == 0:
        return _empty_edges()
    rows = rows.astype(np.int64, copy=False)
    cols = cols.astype(np.int64, copy=False)
    if num_nodes < 2**31:  # (row, col) packed in one int64: shifts are much cheaper than // and %
        shift, mask = 32, (1 << 32) - 1
        if dedupe:
            keep = rows != cols
            key = _sorted_unique((rows[keep] << shift) | cols[keep])  # sorts by (row, col), drops duplicates
        else:
            key = np.sort((rows << shift) | cols)
        edge_index = np.stack([key >> shift, key & mask])
    else:  # pragma: no cover - more than 2**31 nodes
        order = np.lexsort((cols, rows))
        rows, cols = rows[order], cols[order]
        if dedupe:
            keep = (rows != cols) & np.concatenate([[True], (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])])
            rows, cols = rows[keep], cols[keep]
        edge_index = np.stack([rows, cols])
    return torch.from_numpy(edge_index)


def _symmetric_sorted(pairs: np.ndarray, num_nodes: int, dedupe: bool = True) -> Tensor:
    """Undirected pairs ``[P, 2]`` (any order, possibly duplicated) -> sorted symmetric ``[2, E]``.

    ``dedupe=False`` skips the duplicate removal for unique ``i < j`` pairs (``query_pairs``).
    """
    if pairs.size == 0:
        return _empty_edges()
    pairs = pairs.astype(np.int64, copy=False)
    rows = np.concatenate([pairs[:, 0], pairs[:, 1]])
    cols = np.concatenate([pairs[:, 1], pairs[:, 0]])
    return _pack_sort(rows, cols, num_nodes, dedupe)


def _segments(b: Optional[np.ndarray], n: int, num_bags: int):
    """``(bag of each node, counts [B], ptr [B+1])`` for a bag index sorted in bag order."""
    bb = np.zeros(n, dtype=np.int64) if b is None else b
    counts = np.bincount(bb, minlength=num_bags)[:num_bags] if n else np.zeros(num_bags, dtype=np.int64)
    ptr = np.concatenate([[0], np.cumsum(counts)])
    return bb, counts, ptr


def _seg_reduce(values: np.ndarray, ptr: np.ndarray, counts: np.ndarray, ufunc, fill) -> np.ndarray:
    """Per-segment ``ufunc.reduce`` of contiguous segments (``fill`` for empty ones)."""
    out = np.full((counts.size,) + values.shape[1:], fill, dtype=values.dtype)
    nz = counts > 0
    if nz.any():
        out[nz] = ufunc.reduceat(values, ptr[:-1][nz], axis=0)
    return out


# ----------------------------------------------------------------------------------------------
# grid step
# ----------------------------------------------------------------------------------------------
def _step_mode(p, b, num_bags, pts, tree) -> Tuple[np.ndarray, np.ndarray]:
    """Per-bag mode of the rounded nearest-neighbour distance, and its support (see infer_grid_step)."""
    n = p.shape[0]
    nb = max(num_bags, 1)
    steps = np.full(nb, np.nan)
    support = np.full(nb, np.nan)
    if n < 2:
        return steps, support
    bb = np.zeros(n, dtype=np.int64) if b is None else b
    counts = np.bincount(bb, minlength=nb)
    if b is None:
        loc = np.arange(n)
    else:  # rank of each instance within its bag, in input order
        order = np.argsort(bb, kind="stable")
        start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        loc = np.empty(n, dtype=np.int64)
        loc[order] = np.arange(n) - start[bb[order]]
    stride = np.where(counts > STEP_SAMPLES, -(-counts // STEP_SAMPLES), 1)
    sample = np.flatnonzero((loc % stride[bb] == 0) & (counts[bb] >= 2))
    if sample.size == 0:
        return steps, support
    dist, idx = tree.query(pts[sample], k=2)
    d, j = dist[:, 1], idx[:, 1]
    sb = bb[sample]
    ok = np.isfinite(d) & (d > 0) & (j < n)
    ok[ok] = bb[j[ok]] == sb[ok]  # the nearest point of a one-point bag lies in another bag
    rd, rb = np.round(d[ok], 6), sb[ok]
    if rd.size:
        o = np.lexsort((rd, rb))
        rd, rb = rd[o], rb[o]
        starts = np.flatnonzero(np.concatenate([[True], (rd[1:] != rd[:-1]) | (rb[1:] != rb[:-1])]))
        cnt = np.diff(np.append(starts, rd.size))
        run_b, run_v = rb[starts], rd[starts]
        o2 = np.lexsort((run_v, -cnt, run_b))  # per bag: the most frequent, then the smallest value
        first = np.concatenate([[True], run_b[o2][1:] != run_b[o2][:-1]])
        steps[run_b[o2][first]] = run_v[o2][first]
    s = steps[sb]
    with np.errstate(invalid="ignore"):
        near = ok & (np.abs(d - s) <= STEP_RTOL * s)
    ns = np.bincount(sb, minlength=nb)
    hit = np.bincount(sb, weights=near.astype(np.float64), minlength=nb)
    support = np.where(ns > 0, hit / np.maximum(ns, 1), np.nan)
    return steps, support


def infer_grid_step(
    pos: ArrayLike,
    tree: Optional[cKDTree] = None,
    batch: Optional[ArrayLike] = None,
    num_bags: Optional[int] = None,
    return_support: bool = False,
):
    r"""Grid step of a patch lattice: the most common nearest-neighbour distance, per bag.

    .. math::
        s_b = \operatorname{mode}_{i \in b} \min_{j \in b,\ j \ne i} \lVert p_i - p_j \rVert_2 ,
        \qquad
        \sigma_b = \frac{1}{|S_b|} \bigl|\{ i \in S_b : |d_i - s_b| \le 0.01\, s_b \}\bigr|

    computed with :class:`scipy.spatial.cKDTree` (``k=2``) for every patch, or for an evenly strided
    sample :math:`S_b` of 8192 patches in larger bags; distances are rounded to 1e-6 before taking
    the mode (ties: the smallest distance), zero distances (duplicate coordinates) are ignored.
    Works across CLAM tissue contours whose lattices have different origins (only distances are
    used, never ``pos // step``). The *support* :math:`\sigma_b` is the fraction of sampled patches
    whose nearest neighbour lies one step away: close to 1 on a patch grid, about :math:`2/n` for
    scattered points.

    Args:
        pos: coordinates ``[N, 2]`` (tensor or array).
        tree (cKDTree, optional): a tree already built on ``pos``, single bag only (default
            ``None``: built here).
        batch: bag index ``[N]`` (default ``None``: one bag). With it the step is inferred for
            every bag on its own.
        num_bags (int, optional): number of bags ``B`` (default ``batch.max() + 1``).
        return_support (bool): also return the support :math:`\sigma` (default ``False``).

    Returns:
        Without ``batch``: the step as a float, or ``None`` when it cannot be inferred (fewer than
        two distinct points). With ``batch``: a ``float64`` tensor ``[B]``, ``nan`` for such bags.
        With ``return_support``: the pair ``(step, support)`` in the same form.

    Shapes:
        - **input:** ``pos [N, 2]``, ``batch [N]``
        - **output:** a float, or ``[B]`` with ``batch``
    """
    p = as_positions(pos)
    b, nb = _as_batch(batch, p.shape[0], num_bags)
    if tree is not None and b is not None and nb > 1:
        raise ValueError("infer_grid_step: 'tree' is only supported for a single bag (batch=None)")
    if tree is not None:
        pts = p
    else:
        pts, tree, _ = _space(p, b, nb) if p.shape[0] >= 2 else (p, None, 0.0)
    steps, support = _step_mode(p, b, nb, pts, tree)
    if b is None:
        s = None if math.isnan(steps[0]) else float(steps[0])
        sup = None if math.isnan(support[0]) else float(support[0])
        return (s, sup) if return_support else s
    steps_t, support_t = torch.from_numpy(steps[:nb]), torch.from_numpy(support[:nb])
    return (steps_t, support_t) if return_support else steps_t


def _given_steps(step, num_bags: int) -> np.ndarray:
    """Given step(s) as ``float64 [B]``; ``nan`` where none (``None``, non-finite or <= 0)."""
    if step is None:
        return np.full(num_bags, np.nan)
    if isinstance(step, Tensor):
        step = step.detach().cpu().numpy()
    s = np.asarray(step, dtype=np.float64).reshape(-1)
    if s.size == 1:
        s = np.full(num_bags, float(s[0]))
    elif s.size != num_bags:
        raise ValueError(f"'step' must be a number or one value per bag ({num_bags}), got {s.size} values")
    s = s.copy()
    s[~(np.isfinite(s) & (s > 0))] = np.nan
    return s


def _resolve_steps(given: np.ndarray, inferred: np.ndarray, check: bool, single: bool, name: str) -> np.ndarray:
    """Given steps where valid (checked against the coordinates when ``check``), else inferred."""
    steps = np.where(np.isnan(given), inferred, given)
    if check:
        both = ~np.isnan(given) & ~np.isnan(inferred)
        bad = np.zeros_like(both)
        bad[both] = np.abs(inferred[both] - given[both]) > STEP_RTOL * given[both]
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            g, s = given[i], inferred[i]
            where = "" if single else f" of {int(bad.sum())} bag(s) (e.g. bag {i})"
            warnings.warn(
                f"the grid step{where} {g:g} (the '{name}' attribute or argument) disagrees with the "
                f"coordinate spacing ({s:g}, the most common nearest-neighbour distance); trusting the "
                f"coordinates and using step {s:g}",
                UserWarning,
                stacklevel=3,
            )
            steps[bad] = inferred[bad]
    return steps


# ----------------------------------------------------------------------------------------------
# lattice edges
# ----------------------------------------------------------------------------------------------
def _offsets(connectivity: int):
    if connectivity == 8:
        return [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy]
    return [(-1, 0), (0, -1), (0, 1), (1, 0)]


def _dense_lattice(ps, bb, counts, ptr, steps, connectivity):
    r"""Edges of the bags whose patches all sit on one lattice of their step (one origin, no
    duplicates), by a dense grid lookup: :math:`O(N)` gathers, no tree query and no global sort.

    On such a lattice, distance :math:`\le 1.01\sqrt{2}\,s` (:math:`\le 1.01\,s`) means grid
    offsets in :math:`\{-1,0,1\}^2` (with :math:`|dx|+|dy| = 1`), so the result equals the distance
    rule exactly. Bags are laid out one after the other in one cell array, each with a one-cell
    empty border, so offsets never leave a bag. ``ps`` must be in bag order.

    Returns ``(rows, cols, dense [B])``: edges sorted by ``(row, col)`` of the bags handled here;
    the others (several lattice origins, off-lattice or duplicate coordinates, a very sparse
    bounding grid, no step, fewer than two patches) are left to the k-d tree.
    """
    n = ps.shape[0]
    nb = counts.size
    none = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(nb, dtype=bool))
    cand = np.isfinite(steps) & (steps > 0) & (counts >= 2)
    if ps.shape[1] != 2 or not cand.any():
        return none
    s_node = np.where(cand, steps, 1.0)[bb]
    lo = _seg_reduce(ps, ptr, counts, np.minimum, 0.0)
    q = (ps - lo[bb]) / s_node[:, None]
    qi = np.rint(q)
    err = _seg_reduce(np.abs(q - qi).max(axis=1), ptr, counts, np.maximum, np.inf)
    on = cand & (err <= LATTICE_ATOL)
    qi[~on[bb]] = 0
    qi = qi.astype(np.int64)
    w = _seg_reduce(qi[:, 0], ptr, counts, np.maximum, 0) + 3  # one empty cell of border on each side
    h = _seg_reduce(qi[:, 1], ptr, counts, np.maximum, 0) + 3
    dense = on & (w.astype(np.float64) * h <= LATTICE_CELLS_PER_PATCH * counts + 1024)
    if not dense.any():
        return none
    cells = np.where(dense, w * h, 0)
    base = np.concatenate([[0], np.cumsum(cells)])
    nodes = np.flatnonzero(dense[bb])
    h_n = h[bb[nodes]]
    cell = base[bb[nodes]] + (qi[nodes, 0] + 1) * h_n + (qi[nodes, 1] + 1)
    idt = np.int32 if n < 2**31 - 1 else np.int64  # half the memory traffic for the lookups
    grid = np.full(int(base[-1]), -1, dtype=idt)
    ids = nodes.astype(idt)
    grid[cell] = ids
    dup = grid[cell] != ids  # two patches in one cell: duplicate coordinates
    if dup.any():
        dense[np.unique(bb[nodes[dup]])] = False
        keep = dense[bb[nodes]]
        nodes, cell, h_n, ids = nodes[keep], cell[keep], h_n[keep], ids[keep]
        if nodes.size == 0:
            return none
    hs = int(h_n[0]) if h_n.size and (h_n == h_n[0]).all() else None  # one bag: scalar offsets
    offs = _offsets(connectivity)
    nbr = np.empty((nodes.size, len(offs)), dtype=idt)  # neighbour ids, -1 where the cell is empty
    for k, (dx, dy) in enumerate(offs):
        o = dx * hs + dy if hs is not None else dx * h_n + dy
        np.take(grid, cell + o, out=nbr[:, k])
    nbr.sort(axis=1)
    valid = nbr >= 0
    rows = np.repeat(nodes, valid.sum(axis=1))
    cols = nbr[valid].astype(np.int64)
    return rows, cols, dense  # row-major over bags in order: sorted by (row, col)


def lattice_edges(pos: ArrayLike, step: float, connectivity: int = 8) -> Optional[Tensor]:
    r"""The dense-lattice fast path of :func:`grid_edges`, alone: edges of patches that all sit on
    one lattice of spacing ``step`` (one common origin, no duplicates), by a dense grid lookup.

    .. math::
        q_i = (p_i - \min_j p_j) / s \in \mathbb{Z}^2, \qquad
        (i, j) \in E \iff q_j - q_i \in \{-1, 0, 1\}^2 \setminus \{0\}
        \ \ (\text{8-conn.};\ |q_j - q_i|_1 = 1 \text{ for 4-conn.})

    which on such a lattice equals the distance rule of :func:`grid_edges` exactly.

    Args:
        pos: coordinates ``[N, 2]``.
        step (float): the lattice spacing :math:`s`.
        connectivity (int): ``4`` or ``8`` (default ``8``).

    Returns:
        ``edge_index [2, E]`` sorted by ``(row, col)``, or ``None`` when the fast path does not
        apply (several lattice origins as on CLAM contours, off-lattice or duplicate coordinates,
        or a bounding grid with more than 64 cells per patch); :func:`grid_edges` then uses the
        k-d tree.

    Shapes:
        - **input:** ``pos [N, 2]``
        - **output:** ``edge_index [2, E]``
    """
    if connectivity not in (4, 8):
        raise ValueError(f"lattice_edges: 'connectivity' must be 4 or 8, got {connectivity!r}")
    p = as_positions(pos)
    if p.shape[1] != 2:
        return None
    if p.shape[0] < 2:
        return _empty_edges()
    bb, counts, ptr = _segments(None, p.shape[0], 1)
    rows, cols, dense = _dense_lattice(p, bb, counts, ptr, np.array([float(step)]), connectivity)
    if not dense[0]:
        return None
    return torch.from_numpy(np.stack([rows, cols]))


def grid_edges(
    pos: ArrayLike,
    step=None,
    connectivity: int = 8,
    check_step: bool = True,
    batch: Optional[ArrayLike] = None,
    num_bags: Optional[int] = None,
    step_name: str = "step_level0",
):
    r"""4- or 8-neighbour edges of a patch lattice, by level-0 distance in units of the grid step.

    .. math::
        (i, j) \in E \iff i \ne j,\ b_i = b_j \ \text{and}\ \lVert p_i - p_j \rVert_2 \le \rho\, s_{b_i},
        \qquad
        \rho = \begin{cases} 1.01 & \text{connectivity } 4 \\ 1.01\sqrt{2} & \text{connectivity } 8 \end{cases}

    where :math:`s_b` is the grid step of bag :math:`b` (level-0 distance between neighbouring
    patch corners: the level-0 patch size, minus the overlap). Distances (never ``pos // step``)
    make this correct on CLAM's per-contour lattices with different origins, on 40× scans
    (step = 2 × patch size) and on overlapping patches. A bag on one lattice (TRIDENT, synthetic)
    takes a dense-grid lookup (:func:`lattice_edges`); other bags one
    :meth:`~scipy.spatial.cKDTree.query_pairs` per distinct radius.

    Args:
        pos: coordinates ``[N, 2]`` (tensor or array), e.g. level-0 pixels.
        step (float or sequence, optional): the grid step, one number or one per bag. ``None``
            (default; also a non-finite or non-positive entry) infers it with
            :func:`infer_grid_step`, per bag. When given and ``check_step`` is true, it is checked
            against the coordinate spacing; if they differ by more than 1 % the coordinates win
            and a ``UserWarning`` says so.
        connectivity (int): ``4`` or ``8`` (default ``8``).
        check_step (bool): check a given ``step`` against the coordinates (default ``True``).
        batch: bag index ``[N]`` (default ``None``: one bag); edges never join two bags.
        num_bags (int, optional): number of bags ``B`` (default ``batch.max() + 1``).
        step_name (str): what the warning calls the step (default ``'step_level0'``).

    Returns:
        ``(edge_index [2, E] int64, step)``: symmetric, no self-loops, sorted by ``(row, col)``;
        the step used: a float (``None`` for a bag with fewer than two distinct positions, which
        gets no edges), or with ``batch`` a ``float64`` tensor ``[B]`` (``nan`` for such bags).

    Shapes:
        - **input:** ``pos [N, 2]``, ``batch [N]``
        - **output:** ``edge_index [2, E]``
    """
    if connectivity not in (4, 8):
        raise ValueError(f"grid_edges: 'connectivity' must be 4 or 8, got {connectivity!r}")
    p = as_positions(pos)
    n = p.shape[0]
    b, nb = _as_batch(batch, n, num_bags)
    given = _given_steps(step, nb)

    def _out(ei, steps):
        if b is None:
            return ei, (None if math.isnan(steps[0]) else float(steps[0]))
        return ei, torch.from_numpy(steps)

    if n < 2:
        return _out(_empty_edges(), given)
    pts = tree = None
    steps = given
    if check_step or np.isnan(given).any():
        pts, tree, _ = _space(p, b, nb)
        inferred, _ = _step_mode(p, b, nb, pts, tree)
        steps = _resolve_steps(given, inferred, check_step, b is None, step_name)

    # work in bag order (PyG batches already are); map back at the end
    perm = None
    if b is not None and not (np.diff(b) >= 0).all():
        perm = np.argsort(b, kind="stable")
    ps = p if perm is None else p[perm]
    bs = b if perm is None else b[perm]
    bb, counts, ptr = _segments(bs, n, nb)

    rows, cols, dense = _dense_lattice(ps, bb, counts, ptr, steps, connectivity)
    parts = [(rows, cols)] if rows.size else []
    rest = np.isfinite(steps) & (steps > 0) & (counts >= 2) & ~dense
    radius = RADIUS_TOLERANCE * steps * (math.sqrt(2.0) if connectivity == 8 else 1.0)
    for r in np.unique(radius[rest]):  # one tree query per distinct radius (usually one)
        group = rest & (radius == r)
        nodes = np.flatnonzero(group[bb])
        if b is None and tree is not None:  # one bag: reuse the tree of the step inference
            t = tree
        else:
            _, t, _ = _space(ps[nodes], bs[nodes] if bs is not None else None, nb, pad=float(r))
        pairs = t.query_pairs(float(r), output_type="ndarray")  # unique i < j pairs
        if pairs.size:
            pairs = nodes[pairs]
            parts.append((np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])))
    if not parts:
        ei = _empty_edges()
    elif len(parts) == 1 and rows.size and perm is None:
        ei = torch.from_numpy(np.stack([rows, cols]))  # the lattice blocks are already sorted
    else:
        r_all = np.concatenate([q[0] for q in parts])
        c_all = np.concatenate([q[1] for q in parts])
        if perm is not None:
            r_all, c_all = perm[r_all], perm[c_all]
        ei = _pack_sort(r_all, c_all, n, dedupe=False)
    return _out(ei, steps)


# ----------------------------------------------------------------------------------------------
# k-NN and radius edges
# ----------------------------------------------------------------------------------------------
def knn_edges(pos: ArrayLike, k: int, batch: Optional[ArrayLike] = None, num_bags: Optional[int] = None) -> Tensor:
    r"""Symmetrised k-nearest-neighbour edges, per bag, with ties broken by instance index.

    .. math::
        E = \{(i, j), (j, i) : j \in \operatorname{kNN}_k(i)\}, \qquad
        \operatorname{kNN}_k(i) = \text{the } \min(k, n_b - 1) \text{ smallest }
        \bigl(\lVert p_i - p_j \rVert_2,\ j\bigr),\ j \in b_i,\ j \ne i

    (lexicographic: distance, then index), so the graph does not depend on how the k-d tree breaks
    ties (patch lattices are full of them) and a batch gives exactly the per-bag graphs. Rows whose
    :math:`k`-th distance is tied beyond the queried neighbours are queried again with twice as
    many. The union of both directions may give a node more than ``k`` neighbours. No self-loops
    (also with duplicate coordinates); sorted by ``(row, col)``.

    Args:
        pos: coordinates ``[N, d]``.
        k (int): neighbours per instance.
        batch: bag index ``[N]`` (default ``None``: one bag); neighbours never cross bags.
        num_bags (int, optional): number of bags ``B`` (default ``batch.max() + 1``).

    Returns:
        ``edge_index [2, E]`` int64.

    Shapes:
        - **input:** ``pos [N, d]``, ``batch [N]``
        - **output:** ``edge_index [2, E]``
    """
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"knn_edges: 'k' must be a positive integer, got {k!r}")
    k = int(k)
    p = as_positions(pos)
    n = p.shape[0]
    b, nb = _as_batch(batch, n, num_bags)
    if n < 2:
        return _empty_edges()
    pts, tree, diam = _space(p, b, nb)
    todo = np.arange(n)
    kq = min(k + 2, n)  # self, k neighbours and one more to see whether the k-th is tied
    out_r, out_c = [], []
    while todo.size:
        dist, idx = tree.query(pts[todo], k=kq)  # rows sorted by distance
        dist, idx = dist.reshape(todo.size, kq), idx.reshape(todo.size, kq)
        valid = idx < n  # a missing neighbour has index n
        idx = np.where(valid, idx, 0)
        valid &= idx != todo[:, None]
        if b is not None:
            valid &= b[idx] == b[todo][:, None]
        tie = (dist[:, 1:] == dist[:, :-1]).any(axis=1)
        if tie.any():  # order tied distances by index (the tree's order among ties is arbitrary)
            o = np.lexsort((idx[tie], dist[tie]), axis=-1)
            dist[tie] = np.take_along_axis(dist[tie], o, 1)
            idx[tie] = np.take_along_axis(idx[tie], o, 1)
            valid[tie] = np.take_along_axis(valid[tie], o, 1)
        cum = np.cumsum(valid, axis=1)
        sel = valid & (cum <= k)
        has_k = cum[:, -1] >= k
        dk = np.where(has_k, dist[np.arange(todo.size), np.argmax(cum >= k, axis=1)], np.inf)
        # done when no unseen instance can tie the k-th: the last queried distance is larger
        # (larger than every within-bag distance when the bag has fewer than k others)
        done = np.full(todo.size, kq >= n) | (dist[:, -1] > np.minimum(dk, diam))
        sel &= done[:, None]
        out_r.append(np.repeat(todo, sel.sum(axis=1)))
        out_c.append(idx[sel])
        todo = todo[~done]
        kq = min(2 * kq, n)
    rows, cols = np.concatenate(out_r), np.concatenate(out_c)
    return _pack_sort(np.concatenate([rows, cols]), np.concatenate([cols, rows]), n, dedupe=True)


def radius_edges(pos: ArrayLike, r: float, batch: Optional[ArrayLike] = None, num_bags: Optional[int] = None) -> Tensor:
    r"""Radius-graph edges, per bag (one :meth:`scipy.spatial.cKDTree.query_pairs` for the batch).

    .. math::
        (i, j) \in E \iff i \ne j,\ b_i = b_j \ \text{and}\ \lVert p_i - p_j \rVert_2 \le r

    Symmetric, no self-loops, sorted by ``(row, col)``.

    Args:
        pos: coordinates ``[N, d]``.
        r (float): radius in ``pos`` units (positive, finite).
        batch: bag index ``[N]`` (default ``None``: one bag); edges never cross bags.
        num_bags (int, optional): number of bags ``B`` (default ``batch.max() + 1``).

    Returns:
        ``edge_index [2, E]`` int64.

    Shapes:
        - **input:** ``pos [N, d]``, ``batch [N]``
        - **output:** ``edge_index [2, E]``
    """
    if not (float(r) > 0) or not math.isfinite(float(r)):
        raise ValueError(f"radius_edges: 'r' must be a positive finite number, got {r!r}")
    p = as_positions(pos)
    n = p.shape[0]
    b, nb = _as_batch(batch, n, num_bags)
    if n < 2:
        return _empty_edges()
    _, tree, _ = _space(p, b, nb, pad=float(r))
    pairs = tree.query_pairs(float(r), output_type="ndarray")
    return _symmetric_sorted(pairs, n, dedupe=False)
