"""Spatial graphs on patch coordinates (grid, k-NN, radius) and feature-distance edge weights.

All graphs are built by distance in the units of ``data.pos`` (level-0 pixels for bags read from
CLAM/TRIDENT folders), symmetric, without self-loops, with ``edge_index`` sorted by
``(row, col)``; the edges come from the one set of builders in :mod:`graphmil.ops.geometry`
(vectorised with :class:`scipy.spatial.cKDTree`: no per-patch Python loop, no compiled extension
such as ``torch-cluster``).

Applied to a PyG ``Batch`` (or a ``Data`` with a ``batch`` vector) the graph transforms build the
edges **per bag**, like PyG's own ``KNNGraph``: no edge joins two bags, the grid step is inferred
for every bag on its own, the result equals transforming the bags one by one and batching them,
and :meth:`~torch_geometric.data.Batch.to_data_list` returns the new edges.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.transforms import BaseTransform

from graphmil.ops.batching import bag_index, refresh_batch_slices
from graphmil.ops.geometry import (  # noqa: F401  (re-exported: the public names of this module since 0.1)
    LATTICE_CELLS_PER_PATCH,
    RADIUS_TOLERANCE,
    STEP_RTOL,
    STEP_SAMPLES,
    grid_edges,
    infer_grid_step,
    knn_edges,
    radius_edges,
)

__all__ = [
    "grid_edges",
    "infer_grid_step",
    "GridGraph",
    "KNNGraph",
    "RadiusGraph",
    "FeatureDistanceWeights",
]


def _require_pos(data: Data, who: str) -> Tensor:
    pos = data.get("pos") if hasattr(data, "get") else getattr(data, "pos", None)
    if pos is None:
        raise ValueError(f"{who}: the bag has no 'pos' (coordinates [N, 2]); cannot build a spatial graph")
    return pos


def _set_edges(data: Data, edge_index: Tensor, device) -> Data:
    """Set ``edge_index`` (dropping edge weights/attributes) and keep a Batch's slicing in step."""
    for key in ("edge_weight", "edge_attr"):
        if key in data:
            del data[key]
    data.edge_index = edge_index.to(device)
    refresh_batch_slices(data, edge=["edge_index"], drop=["edge_weight", "edge_attr"])
    return data


def _step_attribute(data: Data, num_bags: int, batched: bool):
    """The bags' ``step_level0`` attribute: a float (one bag), ``[B]`` values (a batch), or None."""
    if "step_level0" not in data:
        return None
    attr = data.get("step_level0")
    if attr is None:
        return None
    values = np.asarray(attr.detach().cpu().numpy() if isinstance(attr, Tensor) else attr, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return None
    if not batched:
        return float(values[0])
    if values.size not in (1, num_bags):
        raise ValueError(f"GridGraph: 'step_level0' has {values.size} values for {num_bags} bags")
    return values


class GridGraph(BaseTransform):
    r"""Patch-lattice graph: connect each patch to its 4 or 8 grid neighbours (as in Sm / SmMIL).

    .. math::
        (i, j) \in E \iff i \ne j,\ b_i = b_j \ \text{and}\ \lVert p_i - p_j \rVert_2 \le \rho\, s_{b_i}, \qquad
        \rho = 1.01 \ (4\text{-conn.}),\ 1.01\sqrt{2} \ (8\text{-conn.})

    (:func:`~graphmil.ops.geometry.grid_edges`). The step :math:`s_b` of bag :math:`b` comes from
    (first match): the ``step`` argument; the bag's ``step_level0``
    attribute set by :func:`graphmil.io.read_bag` (checked against the coordinates: if they
    disagree by more than 1 % the coordinates are trusted and a warning is emitted); else the most
    common nearest-neighbour distance of ``pos`` (:func:`infer_grid_step`). Neighbours are found by
    distance in level-0 pixels, so the graph is correct on 40× scans (step = 2 × patch size), on
    CLAM's per-contour lattices and on overlapping patches. The result is symmetric, without
    self-loops, with ``edge_index`` sorted by ``(row, col)``. A one-instance bag gets no edges
    (``Sm`` adds its own self-loop). An existing ``edge_weight``/``edge_attr`` is dropped. On a
    ``Batch`` the edges are built per bag (:math:`b_i` the bag of instance :math:`i`), each bag
    with its own step (bags may differ in magnification): the result equals transforming the bags
    one by one.

    Args:
        connectivity (int): ``4`` or ``8`` (default ``8``).
        step (float, optional): force the grid step in ``pos`` units for every bag (default
            ``None``: from each bag).

    Shapes:
        - **input:** ``Data`` or ``Batch`` with ``pos [N, 2]`` (and ``batch [N]``)
        - **output:** the same object with ``edge_index [2, E]``

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
        batch, num_bags = bag_index(data)
        if self.step is not None:
            edge_index, _ = grid_edges(pos, float(self.step), self.connectivity, check_step=False,
                                       batch=batch, num_bags=num_bags)
        else:
            step = _step_attribute(data, num_bags, batch is not None)
            edge_index, _ = grid_edges(pos, step, self.connectivity, batch=batch, num_bags=num_bags)
        return _set_edges(data, edge_index, pos.device)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(connectivity={self.connectivity}, step={self.step})"


class KNNGraph(BaseTransform):
    r"""Symmetrised k-nearest-neighbour graph on ``pos`` (scipy ``cKDTree``).

    .. math::
        E = \{(i, j), (j, i) : j \in \operatorname{kNN}_k(i),\ j \ne i,\ b_j = b_i\}

    Each node is linked to its ``k`` nearest other nodes of its bag (ties broken by the smaller
    index, :func:`~graphmil.ops.geometry.knn_edges`), then the graph is made undirected (union of
    both directions), so a node may end with more than ``k`` neighbours. No self-loops;
    ``edge_index`` sorted by ``(row, col)``. On a ``Batch`` neighbours never cross bags (as in
    PyG's ``KNNGraph``); the result equals transforming the bags one by one.

    Args:
        k (int): number of neighbours (default ``6``).

    Shapes:
        - **input:** ``Data`` or ``Batch`` with ``pos [N, d]`` (and ``batch [N]``)
        - **output:** ``edge_index [2, E]``
    """

    def __init__(self, k: int = 6) -> None:
        if int(k) != k or k < 1:
            raise ValueError(f"KNNGraph: 'k' must be a positive integer, got {k!r}")
        self.k = int(k)

    def forward(self, data: Data) -> Data:
        pos = _require_pos(data, "KNNGraph")
        batch, num_bags = bag_index(data)
        return _set_edges(data, knn_edges(pos, self.k, batch=batch, num_bags=num_bags), pos.device)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(k={self.k})"


class RadiusGraph(BaseTransform):
    r"""Radius graph on ``pos`` (scipy ``cKDTree.query_pairs``).

    .. math::
        (i, j) \in E \iff i \ne j,\ b_i = b_j \ \text{and}\ \lVert p_i - p_j \rVert_2 \le r

    Symmetric, no self-loops, ``edge_index`` sorted by ``(row, col)``
    (:func:`~graphmil.ops.geometry.radius_edges`). On a ``Batch`` edges never cross bags; the
    result equals transforming the bags one by one.

    Args:
        r (float): radius in ``pos`` units (level-0 pixels for bags read from feature folders).

    Shapes:
        - **input:** ``Data`` or ``Batch`` with ``pos [N, d]`` (and ``batch [N]``)
        - **output:** ``edge_index [2, E]``
    """

    def __init__(self, r: float) -> None:
        if not (float(r) > 0) or not math.isfinite(float(r)):
            raise ValueError(f"RadiusGraph: 'r' must be a positive finite number, got {r!r}")
        self.r = float(r)

    def forward(self, data: Data) -> Data:
        pos = _require_pos(data, "RadiusGraph")
        batch, num_bags = bag_index(data)
        return _set_edges(data, radius_edges(pos, self.r, batch=batch, num_bags=num_bags), pos.device)

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
        refresh_batch_slices(data, edge=["edge_weight"])
        return data

    def __repr__(self) -> str:
        # ``chunk_size`` is left out on purpose: it bounds memory only, every weight is computed
        # from its own edge, so the output (and a dataset cache keyed on this repr) does not depend
        # on it (tested).
        return f"{self.__class__.__name__}()"
