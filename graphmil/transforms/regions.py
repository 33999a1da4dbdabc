"""Spatial region partitions of a bag (AINet, Zheng et al.): compact, connected, ordered regions."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Batch, Data
from torch_geometric.transforms import BaseTransform
from torch_geometric.utils import scatter

from graphmil.utils import segment_count

__all__ = ["RegionPartition", "kd_partition", "global_region_index", "grid_adjacency"]

_METHODS = ("kd", "kmeans", "grid")


# ----------------------------------------------------------------------------------------------
# batched k-d partition (also used on the fly by the AINet front end)
# ----------------------------------------------------------------------------------------------
def kd_partition(
    pos: Tensor,
    batch: Optional[Tensor] = None,
    num_regions: int = 8,
    dim_size: Optional[int] = None,
    min_region_size: int = 1,
) -> Tuple[Tensor, Tensor]:
    r"""Recursive median bisection (a k-d split) of every bag of a batch at once.

    Each cell holding :math:`m > 1` regions and :math:`n` instances is cut along its longer axis
    (ties in the coordinate broken by the other axis, then by instance order) into a lower part of
    :math:`\lfloor n \lfloor m/2 \rfloor / m \rfloor` instances that receives the first
    :math:`\lfloor m/2 \rfloor` regions and an upper part that receives the rest. A bag of
    :math:`n_b` instances gets

    .. math::
        M_b = \max\big(1, \min(M, \lfloor n_b / s_{\min} \rfloor)\big)

    regions, so no region is empty and each holds about :math:`n_b / M_b` instances (sizes differ
    by at most a few instances). The loop runs over the :math:`\lceil \log_2 M \rceil` tree levels,
    never over bags. Regions are numbered in tree order (lower part first); this fast path does
    not repair connectivity nor reorder regions — :class:`RegionPartition` does.

    Args:
        pos (Tensor): coordinates ``[N, 2]``.
        batch (Tensor, optional): bag index ``[N]`` (sorted or not); ``None`` = one bag.
        num_regions (int): regions per bag ``M`` (default ``8``).
        dim_size (int, optional): number of bags ``B``.
        min_region_size (int): smallest allowed region ``s_min`` (default ``1``).

    Returns:
        ``(region [N], num_regions [B])``: local region ids ``0..M_b-1`` and ``M_b`` per bag.
    """
    if num_regions < 1:
        raise ValueError(f"kd_partition: 'num_regions' must be >= 1, got {num_regions}")
    if min_region_size < 1:
        raise ValueError(f"kd_partition: 'min_region_size' must be >= 1, got {min_region_size}")
    if pos.dim() != 2 or pos.size(1) < 2:
        raise ValueError(f"kd_partition: 'pos' must be [N, 2], got shape {tuple(pos.shape)}")
    n = pos.size(0)
    device = pos.device
    if batch is None:
        batch = torch.zeros(n, dtype=torch.long, device=device)
    if dim_size is None:
        dim_size = int(batch.max()) + 1 if n > 0 else 0
    p = pos[:, :2].to(torch.float64)
    counts = segment_count(batch, dim_size)
    m_bag = torch.clamp(torch.minimum(torch.full_like(counts, num_regions), counts // min_region_size), min=1)
    cell = batch.clone()
    cell_m = m_bag.clone()
    cell_base = torch.zeros_like(m_bag)
    arange = torch.arange(n, device=device)
    while bool((cell_m > 1).any()):
        c = cell_m.numel()
        cnt = segment_count(cell, c)
        lo = scatter(p, cell, 0, c, reduce="min")
        hi = scatter(p, cell, 0, c, reduce="max")
        axis = ((hi[:, 1] - lo[:, 1]) > (hi[:, 0] - lo[:, 0])).long()  # longer axis, ties -> x
        ax = axis[cell]
        key = p[arange, ax]
        sec = p[arange, 1 - ax]
        # rank within cell by (key, sec, original order)
        perm = torch.argsort(sec, stable=True)
        perm = perm[torch.argsort(key[perm], stable=True)]
        perm = perm[torch.argsort(cell[perm], stable=True)]
        start = torch.cat([cnt.new_zeros(1), cnt.cumsum(0)[:-1]])
        rank = torch.empty_like(arange)
        rank[perm] = arange - start[cell[perm]]
        m_left = cell_m // 2
        m_right = cell_m - m_left
        n_left = (cnt * m_left) // cell_m.clamp(min=1)
        n_left = torch.minimum(torch.maximum(n_left, m_left * min_region_size), cnt - m_right * min_region_size)
        split = cell_m > 1
        right = (split[cell] & (rank >= n_left[cell])).long()
        cell = 2 * cell + right
        child_m = torch.stack([torch.where(split, m_left, cell_m), torch.where(split, m_right, 0)], 1).view(-1)
        child_base = torch.stack([cell_base, cell_base + m_left], 1).view(-1)
        cell_m, cell_base = child_m, child_base
    return cell_base[cell], m_bag


# ----------------------------------------------------------------------------------------------
# helpers for the per-bag transform (numpy / scipy preprocessing)
# ----------------------------------------------------------------------------------------------
def grid_adjacency(pos: Union[Tensor, np.ndarray], step: Optional[float] = None) -> Optional[np.ndarray]:
    """Edges ``[2, E]`` (both directions) of the 8-neighbour graph of grid-aligned ``pos``.

    The grid step is inferred per axis (smallest positive gap between distinct coordinates) unless
    given. Returns ``None`` when ``pos`` is not on a lattice of that step.
    """
    p = np.asarray(pos.detach().cpu().numpy() if isinstance(pos, Tensor) else pos, dtype=np.float64)[:, :2]
    n = p.shape[0]
    if n < 2:
        return np.zeros((2, 0), dtype=np.int64)
    steps = []
    for a in range(2):
        u = np.unique(p[:, a])
        d = np.diff(u)
        steps.append(float(d.min()) if d.size else 1.0)
    if step is not None:
        steps = [float(step), float(step)]
    g = (p - p.min(0)) / np.asarray(steps)
    gi = np.rint(g)
    if np.abs(g - gi).max() > 1e-4:
        return None
    gi = gi.astype(np.int64)
    width = int(gi[:, 1].max()) + 3
    keys = (gi[:, 0] + 1) * width + (gi[:, 1] + 1)
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    src, dst = [], []
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            if dx == 0 and dy == 0:
                continue
            nk = keys + dx * width + dy
            j = np.searchsorted(sk, nk)
            j = np.minimum(j, n - 1)
            hit = sk[j] == nk
            src.append(np.nonzero(hit)[0])
            dst.append(order[j[hit]])
    return np.stack([np.concatenate(src), np.concatenate(dst)]).astype(np.int64)


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

    Then, when ``pos`` lies on a lattice (patch grid), every region is made **connected in the
    8-neighbour grid graph**: each component of a region other than its largest moves to the
    adjacent region it shares most edges with (repeated until stable). This fixes the stray pieces
    that a median cut of an irregular tissue shape (blobs, holes) leaves; it shifts a few
    instances, so sizes stay near (not exactly) equal. A region can remain disconnected only when
    the tissue itself is: a fragment with no grid edge to any other region. Off-lattice ``pos``
    uses ``data.edge_index`` for the repair when present, and skips it otherwise.

    Finally regions are **renumbered so that consecutive regions touch**: a Hamiltonian path of the
    region adjacency graph found by backtracking (at most a few thousand steps for ``M ≤ 16``);
    if the adjacency graph has none (possible on odd shapes), a greedy path following adjacency and
    then the nearest centroid is used. ARC's "next region" (cyclic, ``M_b-1 → 0``) is this order.

    Batching: ``region`` keeps its per-bag ids (PyG concatenates it unchanged) and ``num_regions``
    becomes a ``[B]`` vector; :func:`global_region_index` turns them into batch-unique ids.

    Args:
        num_regions (int): regions per bag ``M`` (default ``8``).
        method (str): ``'kd'`` (default), ``'kmeans'`` or ``'grid'``.
        min_region_size (int): smallest region ``s_min`` used to cap ``M_b`` (default ``1``).
        seed (int): random state of k-means (default ``0``).
        step (float, optional): grid step of ``pos`` for the 8-neighbour graph (inferred if ``None``).
        repair (bool): make regions connected (default ``True``).
        order (bool): renumber regions along an adjacency path (default ``True``).

    Shapes:
        - **input:** ``data.pos [N, 2]``.
        - **output:** ``data.region [N]`` (long), ``data.num_regions`` (int).
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

    def forward(self, data: Data) -> Data:
        pos = data.get("pos")
        if pos is None:
            raise ValueError("RegionPartition: the bag has no 'pos' (coordinates are needed)")
        if pos.dim() != 2 or pos.size(1) < 2:
            raise ValueError(f"RegionPartition: 'pos' must be [N, 2], got shape {tuple(pos.shape)}")
        p = pos[:, :2].detach().cpu().to(torch.float64).numpy()
        n = p.shape[0]
        m = max(1, min(self.num_regions, n // self.min_region_size))
        labels = self._labels(p, m)
        edges = None
        if (self.repair or self.order) and m > 1:
            edges = grid_adjacency(p, self.step)
            if edges is None and data.get("edge_index") is not None:
                edges = data.edge_index.detach().cpu().numpy()
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
        data.region = torch.from_numpy(labels.astype(np.int64)).to(pos.device)
        data.num_regions = int(m)
        return data

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(num_regions={self.num_regions}, method='{self.method}', "
                f"min_region_size={self.min_region_size}, seed={self.seed}, step={self.step}, "
                f"repair={self.repair}, order={self.order})")


def global_region_index(data: Union[Data, Batch]) -> Tuple[Tensor, int, Tensor]:
    r"""Batch-unique region ids from per-bag ``region`` ids.

    .. math::
        g_i = \rho_i + \sum_{b' < b(i)} M_{b'}

    where :math:`\rho_i` is ``data.region`` and :math:`M_b` is ``data.num_regions`` (a ``[B]``
    vector after PyG batching; inferred as ``max region + 1`` per bag when absent). Works on a
    single bag, on ``Batch.from_data_list`` output and on PyG ``DataLoader`` batches. Ids are
    ordered by ``(bag, region)``.

    Returns:
        ``(region [N], R, region_batch [R])``: global ids, total number of regions, bag of each
        region.
    """
    region = data.get("region")
    if region is None:
        raise ValueError("global_region_index: the data has no 'region' (apply RegionPartition first)")
    batch = data.get("batch")
    n = region.numel()
    if batch is None:
        batch = torch.zeros(n, dtype=torch.long, device=region.device)
        num_bags = 1
    else:
        num_bags = int(data.num_graphs) if hasattr(data, "num_graphs") else int(batch.max()) + 1
    m = data.get("num_regions")
    if m is None:
        m = scatter(region, batch, 0, num_bags, reduce="max") + 1
    else:
        m = torch.as_tensor(m, device=region.device).view(-1).long()
        if m.numel() != num_bags:
            raise ValueError(f"global_region_index: 'num_regions' has {m.numel()} entries for {num_bags} bags")
    offset = torch.cat([m.new_zeros(1), m.cumsum(0)])
    total = int(offset[-1])
    region_batch = torch.repeat_interleave(torch.arange(num_bags, device=region.device), m)
    return region + offset[batch], total, region_batch
