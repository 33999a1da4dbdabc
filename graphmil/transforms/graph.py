"""Spatial graphs on patch coordinates (grid, k-NN, radius) and feature-distance edge weights.

All graphs are built by distance in the units of ``data.pos`` (level-0 pixels for bags read from
CLAM/TRIDENT folders), symmetric, without self-loops, with ``edge_index`` sorted by
``(row, col)``; they are vectorised with :class:`scipy.spatial.cKDTree` (no per-patch Python loop,
no compiled extension such as ``torch-cluster``).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.transforms import BaseTransform

__all__ = [
    "grid_edges",
    "infer_grid_step",
    "GridGraph",
    "KNNGraph",
    "RadiusGraph",
    "FeatureDistanceWeights",
]

#: relative tolerance on the neighbour radius (``1.01 * step`` / ``1.01 * sqrt(2) * step``)
RADIUS_TOLERANCE = 1.01
#: relative difference above which a step attribute and the coordinate spacing "disagree"
STEP_RTOL = 0.01


def _pos_numpy(pos) -> np.ndarray:
    if isinstance(pos, Tensor):
        pos = pos.detach().cpu().numpy()
    pos = np.asarray(pos)
    if pos.ndim != 2 or pos.shape[1] < 2:
        raise ValueError(f"'pos' must be [N, 2] (or [N, d]), got shape {tuple(pos.shape)}")
    if pos.dtype.kind not in "iuf":
        raise ValueError(f"'pos' must be numeric, got dtype {pos.dtype}")
    return np.ascontiguousarray(pos, dtype=np.float64)


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """Sorted unique values of a 1-D array (sort + diff; ``np.unique`` is much slower on big int arrays)."""
    a = np.sort(a, kind="stable" if a.dtype.kind == "f" else None)
    if a.size == 0:
        return a
    keep = np.empty(a.size, dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def _symmetric_sorted(pairs: np.ndarray, num_nodes: int, dedupe: bool = True) -> Tensor:
    """Undirected pairs ``[P, 2]`` (any order, possibly duplicated) -> sorted symmetric ``[2, E]``.

    ``dedupe=False`` skips the duplicate removal for unique ``i < j`` pairs (``query_pairs``).
    """
    if pairs.size == 0:
        return torch.empty(2, 0, dtype=torch.long)
    pairs = pairs.astype(np.int64, copy=False)
    row = np.concatenate([pairs[:, 0], pairs[:, 1]])
    col = np.concatenate([pairs[:, 1], pairs[:, 0]])
    if num_nodes < 2**31:  # (row, col) packed in one int64: shifts are much cheaper than // and %
        shift, mask = 32, (1 << 32) - 1
        if dedupe:
            keep = row != col
            key = _sorted_unique((row[keep] << shift) | col[keep])  # sorts by (row, col), drops duplicates
        else:
            key = np.sort((row << shift) | col)
        edge_index = np.stack([key >> shift, key & mask])
    else:  # pragma: no cover - more than 2**31 nodes
        order = np.lexsort((col, row))
        row, col = row[order], col[order]
        if dedupe:
            keep = (row != col) & np.concatenate([[True], (row[1:] != row[:-1]) | (col[1:] != col[:-1])])
            row, col = row[keep], col[keep]
        edge_index = np.stack([row, col])
    return torch.from_numpy(edge_index)


#: a dense lattice index is used when the bounding grid has at most this many cells per patch
LATTICE_CELLS_PER_PATCH = 64


def _lattice_edges(p: np.ndarray, step: float, connectivity: int) -> Optional[Tensor]:
    """Edges of patches that all sit on one lattice of spacing ``step`` (one common origin, no
    duplicates), by a dense grid lookup: :math:`O(N)` gathers, no tree query and no global sort.

    On such a lattice, distance :math:`\le 1.01\sqrt{2}\,s` (:math:`\le 1.01\,s`) means grid
    offsets in :math:`\{-1,0,1\}^2` (with :math:`|dx|+|dy| = 1`), so the result equals the
    distance rule exactly. Returns ``None`` (the caller uses the k-d tree) for several lattice
    origins (CLAM contours), off-lattice or duplicate coordinates, or a very sparse bounding grid.
    """
    if p.shape[1] != 2:
        return None
    q = (p - p.min(axis=0)) / step
    qi = np.rint(q)
    if np.abs(q - qi).max() > 1e-3:
        return None
    qi = qi.astype(np.int64)
    n = p.shape[0]
    w, h = int(qi[:, 0].max()) + 3, int(qi[:, 1].max()) + 3  # one empty cell of border on each side
    if w * h > LATTICE_CELLS_PER_PATCH * n + 1024:
        return None
    idt = np.int32 if n < 2**31 - 1 else np.int64  # half the memory traffic for the lookups
    grid = np.full(w * h, -1, dtype=idt)
    cell = (qi[:, 0] + 1) * h + (qi[:, 1] + 1)
    ids = np.arange(n, dtype=idt)
    grid[cell] = ids
    if not np.array_equal(grid[cell], ids):  # two patches in one cell: duplicate coordinates
        return None
    if connectivity == 8:
        offsets = [dx * h + dy for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy]
    else:
        offsets = [-h, -1, 1, h]
    nb = np.empty((n, len(offsets)), dtype=idt)  # neighbour ids, -1 where the cell is empty
    for j, o in enumerate(offsets):
        np.take(grid, cell + o, out=nb[:, j])
    nb.sort(axis=1)
    valid = nb >= 0
    rows = torch.repeat_interleave(torch.arange(n), torch.from_numpy(valid.sum(axis=1)))
    cols = torch.from_numpy(nb[valid]).long()
    return torch.stack([rows, cols])  # row-major: sorted by (row, col)


#: at most this many (evenly strided) patches are queried to infer the step
STEP_SAMPLES = 8192


def _tree(p: np.ndarray) -> cKDTree:
    # midpoint splits build ~3x faster than the balanced median tree and query as fast on lattices
    return cKDTree(p, balanced_tree=False, compact_nodes=False)


def infer_grid_step(pos, tree: Optional[cKDTree] = None) -> Optional[float]:
    r"""Grid step of a patch lattice: the most common nearest-neighbour distance.

    .. math::
        s = \operatorname{mode}_i \min_{j \ne i} \lVert p_i - p_j \rVert_2

    computed with :class:`scipy.spatial.cKDTree` (``k=2``) for every patch, or for an evenly strided
    sample of 8192 patches in larger bags; distances are rounded to 1e-6 before taking the mode,
    zero distances (duplicate coordinates) are ignored. Works across CLAM tissue
    contours whose lattices have different origins (only distances are used, never
    ``pos // step``).

    Args:
        pos: coordinates ``[N, 2]`` (tensor or array).
        tree (cKDTree, optional): a tree already built on ``pos`` (default ``None``: built here).

    Returns:
        The step as a float, or ``None`` when it cannot be inferred (fewer than two distinct points).

    Shapes:
        - **input:** ``pos [N, 2]``
    """
    p = _pos_numpy(pos)
    if p.shape[0] < 2:
        return None
    if tree is None:
        tree = _tree(p)
    sample = p if p.shape[0] <= STEP_SAMPLES else p[:: -(-p.shape[0] // STEP_SAMPLES)]
    dist, _ = tree.query(sample, k=2)
    d = dist[:, 1]
    d = d[np.isfinite(d) & (d > 0)]
    if d.size == 0:
        return None
    d = np.sort(np.round(d, 6))
    starts = np.flatnonzero(np.concatenate([[True], d[1:] != d[:-1]]))
    counts = np.diff(np.append(starts, d.size))
    return float(d[starts[np.argmax(counts)]])


def _resolve_step(pos: np.ndarray, step: Optional[float], name: str = "step_level0", tree=None) -> Optional[float]:
    """Check a given step against the coordinates; trust the coordinates when they disagree."""
    inferred = infer_grid_step(pos, tree)
    if step is None or not (step > 0) or not math.isfinite(step):
        return inferred
    if inferred is not None and abs(inferred - step) > STEP_RTOL * step:
        warnings.warn(
            f"the grid step {step:g} (the '{name}' attribute or argument) disagrees with the coordinate "
            f"spacing ({inferred:g}, the most common nearest-neighbour distance); trusting the "
            f"coordinates and using step {inferred:g}",
            UserWarning,
            stacklevel=3,
        )
        return inferred
    return float(step)


def grid_edges(pos, step: Optional[float] = None, connectivity: int = 8, check_step: bool = True) -> Tuple[Tensor, Optional[float]]:
    r"""4- or 8-neighbour edges of a patch lattice, by level-0 distance in units of the grid step.

    .. math::
        (i, j) \in E \iff i \ne j \ \text{and}\ \lVert p_i - p_j \rVert_2 \le \rho\, s, \qquad
        \rho = \begin{cases} 1.01 & \text{connectivity } 4 \\ 1.01\sqrt{2} & \text{connectivity } 8 \end{cases}

    where :math:`s` is the grid step (level-0 distance between neighbouring patch corners: the
    level-0 patch size, minus the overlap). Distances (never ``pos // step``) make this correct on
    CLAM's per-contour lattices with different origins, on 40× scans (step = 2 × patch size) and on
    overlapping patches.

    Args:
        pos: coordinates ``[N, 2]`` (tensor or array), e.g. level-0 pixels.
        step (float, optional): the grid step. ``None`` (default) infers it with
            :func:`infer_grid_step`. When given and ``check_step`` is true, it is checked against the
            coordinate spacing; if they differ by more than 1 % the coordinates win and a
            ``UserWarning`` says so.
        connectivity (int): ``4`` or ``8`` (default ``8``).
        check_step (bool): check a given ``step`` against the coordinates (default ``True``).

    Returns:
        ``(edge_index [2, E] int64, step)``: symmetric, no self-loops, sorted by ``(row, col)``;
        the step used (``None`` for bags with fewer than two distinct positions, which get no edges).

    Shapes:
        - **input:** ``pos [N, 2]``
        - **output:** ``edge_index [2, E]``
    """
    if connectivity not in (4, 8):
        raise ValueError(f"grid_edges: 'connectivity' must be 4 or 8, got {connectivity!r}")
    p = _pos_numpy(pos)
    n = p.shape[0]
    if step is not None and (not math.isfinite(float(step)) or float(step) <= 0):
        step = None
    if n < 2:
        return torch.empty(2, 0, dtype=torch.long), (None if step is None else float(step))
    tree = _tree(p)
    step = _resolve_step(p, None if step is None else float(step), tree=tree) if (check_step or step is None) else float(step)
    if step is None:
        return torch.empty(2, 0, dtype=torch.long), step
    lattice = _lattice_edges(p, step, connectivity)  # one lattice (TRIDENT, synthetic): no tree query
    if lattice is not None:
        return lattice, step
    radius = RADIUS_TOLERANCE * step * (math.sqrt(2.0) if connectivity == 8 else 1.0)
    pairs = tree.query_pairs(radius, output_type="ndarray")  # unique i < j pairs
    return _symmetric_sorted(pairs, n, dedupe=False), step


def _require_pos(data: Data, who: str) -> Tensor:
    pos = data.get("pos") if hasattr(data, "get") else getattr(data, "pos", None)
    if pos is None:
        raise ValueError(f"{who}: the bag has no 'pos' (coordinates [N, 2]); cannot build a spatial graph")
    return pos


def _drop_edge_attrs(data: Data) -> None:
    for key in ("edge_weight", "edge_attr"):
        if key in data:
            del data[key]


class GridGraph(BaseTransform):
    r"""Patch-lattice graph: connect each patch to its 4 or 8 grid neighbours (as in Sm / SmMIL).

    .. math::
        (i, j) \in E \iff i \ne j \ \text{and}\ \lVert p_i - p_j \rVert_2 \le \rho\, s, \qquad
        \rho = 1.01 \ (4\text{-conn.}),\ 1.01\sqrt{2} \ (8\text{-conn.})

    The step :math:`s` comes from (first match): the ``step`` argument; the bag's ``step_level0``
    attribute set by :func:`graphmil.io.read_bag` (checked against the coordinates: if they
    disagree by more than 1 % the coordinates are trusted and a warning is emitted); else the most
    common nearest-neighbour distance of ``pos`` (:func:`infer_grid_step`). Neighbours are found by
    distance in level-0 pixels, so the graph is correct on 40× scans (step = 2 × patch size), on
    CLAM's per-contour lattices and on overlapping patches. The result is symmetric, without
    self-loops, with ``edge_index`` sorted by ``(row, col)``. A one-instance bag gets no edges
    (``Sm`` adds its own self-loop). An existing ``edge_weight``/``edge_attr`` is dropped.

    Args:
        connectivity (int): ``4`` or ``8`` (default ``8``).
        step (float, optional): force the grid step in ``pos`` units (default ``None``: from the bag).

    Shapes:
        - **input:** ``Data`` with ``pos [N, 2]``
        - **output:** the same ``Data`` with ``edge_index [2, E]``

    Example:
        >>> import torch
        >>> from graphmil import make_bag
        >>> pos = torch.tensor([[0, 0], [512, 0], [0, 512], [512, 512], [2048, 0]])
        >>> bag = GridGraph()(make_bag(torch.randn(5, 4), pos=pos))
        >>> bag.edge_index.size(1)
        12
    """

    def __init__(self, connectivity: int = 8, step: Optional[float] = None) -> None:
        if connectivity not in (4, 8):
            raise ValueError(f"GridGraph: 'connectivity' must be 4 or 8, got {connectivity!r}")
        if step is not None and not (float(step) > 0):
            raise ValueError(f"GridGraph: 'step' must be positive, got {step!r}")
        self.connectivity = connectivity
        self.step = step

    def forward(self, data: Data) -> Data:
        pos = _require_pos(data, "GridGraph")
        if self.step is not None:
            edge_index, _ = grid_edges(pos, float(self.step), self.connectivity, check_step=False)
        else:
            attr = data.get("step_level0") if "step_level0" in data else None
            if isinstance(attr, Tensor):
                attr = float(attr.view(-1)[0]) if attr.numel() else None
            edge_index, _ = grid_edges(pos, None if attr is None else float(attr), self.connectivity)
        _drop_edge_attrs(data)
        data.edge_index = edge_index
        return data

    def __repr__(self) -> str:
        extra = "" if self.step is None else f", step={self.step}"
        return f"{self.__class__.__name__}(connectivity={self.connectivity}{extra})"


class KNNGraph(BaseTransform):
    r"""Symmetrised k-nearest-neighbour graph on ``pos`` (scipy ``cKDTree``).

    .. math::
        E = \{(i, j), (j, i) : j \in \operatorname{kNN}_k(i),\ j \ne i\}

    Each node is linked to its ``k`` nearest other nodes (ties broken by the tree), then the graph
    is made undirected (union of both directions), so a node may end with more than ``k``
    neighbours. No self-loops; ``edge_index`` sorted by ``(row, col)``.

    Args:
        k (int): number of neighbours (default ``6``).

    Shapes:
        - **input:** ``Data`` with ``pos [N, d]``
        - **output:** ``edge_index [2, E]``
    """

    def __init__(self, k: int = 6) -> None:
        if int(k) != k or k < 1:
            raise ValueError(f"KNNGraph: 'k' must be a positive integer, got {k!r}")
        self.k = int(k)

    def forward(self, data: Data) -> Data:
        p = _pos_numpy(_require_pos(data, "KNNGraph"))
        n = p.shape[0]
        _drop_edge_attrs(data)
        if n < 2:
            data.edge_index = torch.empty(2, 0, dtype=torch.long)
            return data
        kk = min(self.k + 1, n)
        _, idx = _tree(p).query(p, k=kk)
        idx = idx.reshape(n, kk)
        rows = np.broadcast_to(np.arange(n)[:, None], idx.shape)
        not_self = idx != rows
        # exactly k non-self neighbours per row (with duplicate points the node itself may not be first)
        keep = not_self & (np.cumsum(not_self, axis=1) <= self.k)
        pairs = np.stack([rows[keep], idx[keep]], axis=1)
        data.edge_index = _symmetric_sorted(pairs, n)
        return data

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(k={self.k})"


class RadiusGraph(BaseTransform):
    r"""Radius graph on ``pos`` (scipy ``cKDTree.query_pairs``).

    .. math::
        (i, j) \in E \iff i \ne j \ \text{and}\ \lVert p_i - p_j \rVert_2 \le r

    Symmetric, no self-loops, ``edge_index`` sorted by ``(row, col)``.

    Args:
        r (float): radius in ``pos`` units (level-0 pixels for bags read from feature folders).

    Shapes:
        - **input:** ``Data`` with ``pos [N, d]``
        - **output:** ``edge_index [2, E]``
    """

    def __init__(self, r: float) -> None:
        if not (float(r) > 0) or not math.isfinite(float(r)):
            raise ValueError(f"RadiusGraph: 'r' must be a positive finite number, got {r!r}")
        self.r = float(r)

    def forward(self, data: Data) -> Data:
        p = _pos_numpy(_require_pos(data, "RadiusGraph"))
        _drop_edge_attrs(data)
        pairs = _tree(p).query_pairs(self.r, output_type="ndarray") if p.shape[0] > 1 else np.empty((0, 2))
        data.edge_index = _symmetric_sorted(pairs, p.shape[0], dedupe=False)
        return data

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(r={self.r})"


class FeatureDistanceWeights(BaseTransform):
    r"""Edge weights from feature distances, the option of the Sm paper (Castro-Macías et al., 2024).

    .. math::
        w_{ij} = \exp\!\left(-\frac{\lVert x_i - x_j \rVert_2}{D}\right)

    with :math:`D` the feature width. Sets ``data.edge_weight [E]`` (float32, in ``(0, 1]``) for
    the existing ``edge_index``; computed in chunks of edges so memory stays bounded on 1M-patch bags.

    Args:
        chunk_size (int): edges per chunk (default ``65536``).

    Shapes:
        - **input:** ``Data`` with ``x [N, D]`` and ``edge_index [2, E]``
        - **output:** ``edge_weight [E]``
    """

    def __init__(self, chunk_size: int = 65536) -> None:
        if int(chunk_size) < 1:
            raise ValueError(f"FeatureDistanceWeights: 'chunk_size' must be >= 1, got {chunk_size!r}")
        self.chunk_size = int(chunk_size)

    def forward(self, data: Data) -> Data:
        if data.get("edge_index") is None:
            raise ValueError("FeatureDistanceWeights: the bag has no 'edge_index'; build a graph first (e.g. GridGraph)")
        if data.get("x") is None:
            raise ValueError("FeatureDistanceWeights: the bag has no 'x'")
        x = data.x.to(torch.float32)
        row, col = data.edge_index
        d = x.size(-1)
        out = torch.empty(row.numel(), dtype=torch.float32, device=x.device)
        for start in range(0, row.numel(), self.chunk_size):
            sl = slice(start, start + self.chunk_size)
            out[sl] = torch.exp(-(x[row[sl]] - x[col[sl]]).norm(dim=-1) / d)
        data.edge_weight = out
        return data

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"
