"""Spatial region partitions of a bag (AINet, Zheng et al.): compact, connected, ordered regions.

The batched k-d split and the batch-unique region ids live in :mod:`graphmil.ops.partition` (the
AINet front end in :mod:`graphmil.nn` uses them too); they are re-exported here, so
``from graphmil.transforms.regions import kd_partition, global_region_index`` keeps working.
The 8-neighbour grid graph comes from the one lattice builder, :func:`graphmil.ops.geometry.grid_edges`.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.transforms import BaseTransform

from graphmil.ops.batching import bag_index, refresh_batch_slices
from graphmil.ops.geometry import as_positions, grid_edges, infer_grid_step
from graphmil.ops.partition import global_region_index, kd_partition  # noqa: F401  (re-exported)

__all__ = ["RegionPartition", "kd_partition", "global_region_index", "grid_adjacency"]

_METHODS = ("kd", "kmeans", "grid")


#: a bag counts as a patch grid when at least this fraction of its (sampled) patches have their
#: nearest neighbour one grid step away (``support`` of :func:`graphmil.ops.geometry.infer_grid_step`)
GRID_SUPPORT = 0.5


def grid_adjacency(pos: Union[Tensor, np.ndarray], step: Optional[float] = None) -> Optional[np.ndarray]:
    r"""Edges ``[2, E]`` (both directions) of the 8-neighbour graph of a patch grid, or ``None``.

    .. math::
        (i, j) \in E \iff i \ne j \ \text{and}\ \lVert p_i - p_j \rVert_2 \le 1.01\sqrt{2}\, s

    built by :func:`graphmil.ops.geometry.grid_edges` (so CLAM's per-contour lattices with
    different origins are handled). ``step`` given: that step is used as is. ``step=None``: the
    step :math:`s` is inferred (most common nearest-neighbour distance,
    :func:`~graphmil.ops.geometry.infer_grid_step`) and ``pos`` counts as a patch grid when the
    support :math:`\sigma \ge 0.5` (at least half of the patches have a neighbour exactly one
    step away); scattered points (e.g. cell centroids) give ``None``.

    Args:
        pos: coordinates ``[N, 2]`` (tensor or array).
        step (float, optional): the grid step (default ``None``: inferred).

    Returns:
        ``np.ndarray [2, E]`` int64 sorted by ``(row, col)``, or ``None`` when ``pos`` is not a
        patch grid.

    Shapes:
        - **input:** ``pos [N, 2]``
        - **output:** ``[2, E]``
    """
    p = as_positions(pos)[:, :2]
    if p.shape[0] < 2:
        return np.zeros((2, 0), dtype=np.int64)
    if step is None:
        s, support = infer_grid_step(p, return_support=True)
        if s is None or support < GRID_SUPPORT:
            return None
        step = s
    edge_index, _ = grid_edges(p, float(step), 8, check_step=False)
    return edge_index.numpy()


def _components(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n)).tocsr()
    return connected_components(g, directed=False)[1]


def _repair(labels: np.ndarray, edges: np.ndarray, max_rounds: int = 20) -> np.ndarray:
    """Move every component of a region except its largest to the adjacent region it shares most
    edges with (the smaller region on ties), until all regions are connected."""
    labels = labels.copy()
    n = labels.size
    rows, cols = edges
    for _ in range(max_rounds):
        same = labels[rows] == labels[cols]
        comp = _components(n, rows[same], cols[same])
        ncomp = int(comp.max()) + 1
        size = np.bincount(comp, minlength=ncomp)
        comp_region = np.zeros(ncomp, dtype=np.int64)
        comp_region[comp] = labels
        # largest component of each region
        order = np.lexsort((-np.arange(ncomp), size, comp_region))  # by region, then size asc
        best = {}
        for cidx in order:
            best[int(comp_region[cidx])] = int(cidx)
        stray = [c for c in range(ncomp) if best[int(comp_region[c])] != c]
        if not stray:
            break
        region_size = np.bincount(labels)
        num = region_size.size
        is_stray = np.zeros(ncomp, dtype=bool)
        is_stray[stray] = True
        # edges leaving a stray component into another region, counted per (component, region)
        # (into the main piece of that region when possible, so that two strays never swap)
        e = is_stray[comp[rows]] & (labels[cols] != labels[rows])
        if (e & ~is_stray[comp[cols]]).any():
            e &= ~is_stray[comp[cols]]
        pairs, freq = np.unique(comp[rows[e]] * num + labels[cols[e]], return_counts=True)
        moved = False
        if pairs.size:
            pc, pr = pairs // num, pairs % num
            # best target per component: most shared edges, then the smaller region
            order = np.lexsort((region_size[pr], -freq, pc))
            first = np.ones(order.size, dtype=bool)
            first[1:] = pc[order][1:] != pc[order][:-1]
            target = np.full(ncomp, -1, dtype=np.int64)
            target[pc[order][first]] = pr[order][first]
            move = target[comp] >= 0
            labels[move] = target[comp][move]
            moved = bool(move.any())
        if not moved:
            break
    # compact ids (a region never empties, but stay safe)
    _, labels = np.unique(labels, return_inverse=True)
    return labels.reshape(-1)


def _hamiltonian_order(adj: np.ndarray, centroids: np.ndarray, budget: int = 200_000) -> np.ndarray:
    """An order of the regions in which consecutive regions are adjacent (a Hamiltonian path of the
    region adjacency graph, by backtracking with the fewest-neighbours-first rule), or a greedy
    nearest-centroid path when none is found within ``budget`` steps."""
    m = adj.shape[0]
    if m <= 1:
        return np.arange(m)
    deg = adj.sum(1)
    steps = [0]

    def dfs(path, seen):
        if len(path) == m:
            return path
        steps[0] += 1
        if steps[0] > budget:
            return None
        last = path[-1]
        nbrs = [j for j in np.nonzero(adj[last])[0] if not seen[j]]
        nbrs.sort(key=lambda j: (sum(1 for k in np.nonzero(adj[j])[0] if not seen[k]), j))
        for j in nbrs:
            seen[j] = True
            res = dfs(path + [int(j)], seen)
            if res is not None:
                return res
            seen[j] = False
        return None

    for s in np.argsort(deg, kind="stable"):
        seen = np.zeros(m, dtype=bool)
        seen[s] = True
        res = dfs([int(s)], seen)
        if res is not None:
            return np.asarray(res)
        if steps[0] > budget:
            break
    # greedy fallback
    start = int(np.argmin(deg))
    path, seen = [start], np.zeros(m, dtype=bool)
    seen[start] = True
    while len(path) < m:
        last = path[-1]
        cand = [j for j in np.nonzero(adj[last])[0] if not seen[j]]
        if not cand:
            cand = list(np.nonzero(~seen)[0])
        d = np.linalg.norm(centroids[cand] - centroids[last], axis=1)
        j = int(cand[int(np.argmin(d))])
        path.append(j)
        seen[j] = True
    return np.asarray(path)


class RegionPartition(BaseTransform):
    r"""Partition a bag into spatial regions (AINet, Zheng et al.; graphmil's region model).

    Sets ``data.region [N]`` (ids ``0..M_b-1``) and ``data.num_regions`` (``M_b``, an ``int``).
    A bag of :math:`n` instances gets

    .. math::
        M_b = \max\big(1, \min(M, \lfloor n / s_{\min} \rfloor)\big), \qquad
        |R_m| \approx \lceil n / M_b \rceil ,

    regions, none of them empty. Methods:

    - ``'kd'`` (default): recursive median bisection along the longer axis
      (:func:`kd_partition`); sizes are equal up to a few instances.
    - ``'kmeans'``: k-means on ``pos`` (``scikit-learn``, ``n_init=4``, ``random_state=seed``);
      compact, sizes not balanced.
    - ``'grid'``: a fixed ``g_x × g_y`` grid of bounding-box cells (``g_x g_y = M``, the factor
      pair closest to the aspect ratio), empty cells dropped; sizes not balanced.

    Then, when ``pos`` is a patch grid (at least half of the patches have a neighbour exactly one
    grid step away, :func:`grid_adjacency`; CLAM's per-contour lattices with different origins
    included), every region is made **connected in the 8-neighbour grid graph**
    (:func:`graphmil.ops.geometry.grid_edges`, by level-0 distance): each component of a region other than its largest moves to the
    adjacent region it shares most edges with (repeated until stable). This fixes the stray pieces
    that a median cut of an irregular tissue shape (blobs, holes) leaves; it shifts a few
    instances, so sizes stay near (not exactly) equal. A region can remain disconnected only when
    the tissue itself is: a fragment with no grid edge to any other region. Other ``pos``
    (scattered points) uses ``data.edge_index`` for the repair when present, and skips it otherwise.

    Finally regions are **renumbered so that consecutive regions touch**: a Hamiltonian path of the
    region adjacency graph found by backtracking (at most a few thousand steps for ``M ≤ 16``);
    if the adjacency graph has none (possible on odd shapes), a greedy path following adjacency and
    then the nearest centroid is used. ARC's "next region" (cyclic, ``M_b-1 → 0``) is this order.

    Batching: ``region`` keeps its per-bag ids (PyG concatenates it unchanged) and ``num_regions``
    becomes a ``[B]`` vector; :func:`global_region_index` turns them into batch-unique ids. Applied
    to a ``Batch`` (or a ``Data`` with ``batch``), every bag is partitioned on its own with the same
    result as partitioning the bags one by one and batching them (``num_regions`` is then ``[B]``).

    Args:
        num_regions (int): regions per bag ``M`` (default ``8``).
        method (str): ``'kd'`` (default), ``'kmeans'`` or ``'grid'``.
        min_region_size (int): smallest region ``s_min`` used to cap ``M_b`` (default ``1``).
        seed (int): random state of k-means (default ``0``).
        step (float, optional): grid step of ``pos`` for the 8-neighbour graph (default ``None``:
            inferred per bag, and the patch-grid test applies).
        repair (bool): make regions connected (default ``True``).
        order (bool): renumber regions along an adjacency path (default ``True``).

    Shapes:
        - **input:** ``data.pos [N, 2]`` (and ``data.batch [N]``).
        - **output:** ``data.region [N]`` (long), ``data.num_regions`` (int; ``[B]`` on a batch).
    """

    def __init__(
        self,
        num_regions: int = 8,
        method: str = "kd",
        min_region_size: int = 1,
        seed: int = 0,
        step: Optional[float] = None,
        repair: bool = True,
        order: bool = True,
    ) -> None:
        if num_regions < 1:
            raise ValueError(f"RegionPartition: 'num_regions' must be >= 1, got {num_regions}")
        if method not in _METHODS:
            raise ValueError(f"RegionPartition: 'method' must be one of {_METHODS}, got '{method}'")
        if min_region_size < 1:
            raise ValueError(f"RegionPartition: 'min_region_size' must be >= 1, got {min_region_size}")
        self.num_regions = num_regions
        self.method = method
        self.min_region_size = min_region_size
        self.seed = seed
        self.step = step
        self.repair = repair
        self.order = order

    # -- labels per method ------------------------------------------------------------------
    def _labels(self, p: np.ndarray, m: int) -> np.ndarray:
        n = p.shape[0]
        if m == 1:
            return np.zeros(n, dtype=np.int64)
        if self.method == "kd":
            region, _ = kd_partition(torch.from_numpy(p), None, m, 1, self.min_region_size)
            return region.numpy()
        if self.method == "kmeans":
            from sklearn.cluster import KMeans

            km = KMeans(n_clusters=m, n_init=4, random_state=self.seed).fit(p)
            labels = km.labels_.astype(np.int64)
        else:  # grid
            lo, hi = p.min(0), p.max(0)
            ext = np.maximum(hi - lo, 1e-12)
            # the factor pair gx * gy = M closest to the bounding box's aspect ratio
            pairs = [(a, m // a) for a in range(1, m + 1) if m % a == 0]
            gx, gy = min(pairs, key=lambda q: abs(np.log(q[0] / q[1]) - np.log(ext[0] / ext[1])))
            cx = np.minimum(((p[:, 0] - lo[0]) / ext[0] * gx).astype(np.int64), gx - 1)
            cy = np.minimum(((p[:, 1] - lo[1]) / ext[1] * gy).astype(np.int64), gy - 1)
            labels = cx * gy + cy
        _, labels = np.unique(labels, return_inverse=True)
        return labels.reshape(-1).astype(np.int64)

    def _edges(self, p: np.ndarray) -> Optional[np.ndarray]:
        """8-neighbour grid edges of one bag (``None`` when ``pos`` is not a patch grid)."""
        return grid_adjacency(p, self.step)

    def _partition(self, p: np.ndarray, fallback: Optional[np.ndarray]) -> Tuple[np.ndarray, int]:
        """``(labels [n], M_b)`` of one bag; ``fallback`` = the bag's own edges, used off-grid."""
        n = p.shape[0]
        m = max(1, min(self.num_regions, n // self.min_region_size))
        labels = self._labels(p, m)
        edges = None
        if (self.repair or self.order) and m > 1:
            edges = self._edges(p)
            if edges is None:
                edges = fallback
        if self.repair and edges is not None and m > 1:
            labels = _repair(labels, edges)
        m = int(labels.max()) + 1 if n else 0
        if self.order and edges is not None and m > 2:
            a, b = labels[edges[0]], labels[edges[1]]
            adj = np.zeros((m, m), dtype=bool)
            adj[a, b] = True
            adj[b, a] = True
            np.fill_diagonal(adj, False)
            cent = np.stack([np.bincount(labels, weights=p[:, d], minlength=m) for d in range(2)], 1)
            cent /= np.bincount(labels, minlength=m)[:, None]
            path = _hamiltonian_order(adj, cent)
            inv = np.empty(m, dtype=np.int64)
            inv[path] = np.arange(m)
            labels = inv[labels]
        return labels.astype(np.int64), int(m)

    def forward(self, data: Data) -> Data:
        pos = data.get("pos")
        if pos is None:
            raise ValueError("RegionPartition: the bag has no 'pos' (coordinates are needed)")
        if pos.dim() != 2 or pos.size(1) < 2:
            raise ValueError(f"RegionPartition: 'pos' must be [N, 2], got shape {tuple(pos.shape)}")
        p = pos[:, :2].detach().cpu().to(torch.float64).numpy()
        ei = data.get("edge_index")
        ei = None if ei is None else ei.detach().cpu().numpy()
        batch, num_bags = bag_index(data)
        if batch is None:
            labels, m = self._partition(p, ei)
            data.region = torch.from_numpy(labels).to(pos.device)
            data.num_regions = m
            return data
        # a batch: partition every bag on its own (the repair and ordering are per-bag algorithms)
        b = batch.detach().cpu().numpy().astype(np.int64)
        n = b.size
        order = np.argsort(b, kind="stable")
        counts = np.bincount(b, minlength=num_bags)
        ptr = np.concatenate([[0], np.cumsum(counts)])
        local = np.empty(n, dtype=np.int64)
        local[order] = np.arange(n) - ptr[b[order]]
        if ei is not None:  # each bag's own edges, relabelled to local ids, grouped by bag
            ei = ei[:, b[ei[0]] == b[ei[1]]]
            eb = b[ei[0]]
            eorder = np.argsort(eb, kind="stable")
            ei, eptr = ei[:, eorder], np.concatenate([[0], np.cumsum(np.bincount(eb, minlength=num_bags))])
        labels = np.zeros(n, dtype=np.int64)
        ms = np.zeros(num_bags, dtype=np.int64)
        for k in range(num_bags):
            nodes = order[ptr[k]:ptr[k + 1]]
            fb = None if ei is None else local[ei[:, eptr[k]:eptr[k + 1]]]
            labels[nodes], ms[k] = self._partition(p[nodes], fb)
        data.region = torch.from_numpy(labels).to(pos.device)
        data.num_regions = torch.from_numpy(ms).to(pos.device)
        refresh_batch_slices(data, node=["region"], graph=["num_regions"], num_bags=num_bags)
        return data

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(num_regions={self.num_regions}, method='{self.method}', "
                f"min_region_size={self.min_region_size}, seed={self.seed}, step={self.step}, "
                f"repair={self.repair}, order={self.order})")
