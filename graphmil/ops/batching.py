r"""Bag bookkeeping for transforms applied to a PyG :class:`~torch_geometric.data.Batch`.

A transform that sets or changes attributes of a ``Batch`` in place must also update the batch's
slicing tables (``_slice_dict``, ``_inc_dict``), or :meth:`~torch_geometric.data.Batch.to_data_list`
silently returns the bags without the new attributes (or with the old edges). These helpers find
the bag index of a bag or batch and rebuild those tables.
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
from torch import Tensor
from torch_geometric.data import Batch, Data

__all__ = ["bag_index", "refresh_batch_slices"]


def bag_index(data: Data) -> Tuple[Optional[Tensor], int]:
    r"""The bag index of a bag or batch and the number of bags.

    .. math::
        B = \begin{cases} \texttt{data.num\_graphs} & \text{a } \texttt{Batch} \\
        \max_i b_i + 1 & \text{a } \texttt{Data} \text{ with a } \texttt{batch} \text{ vector} \\
        1 & \text{otherwise (one bag)} \end{cases}

    Args:
        data (Data or Batch): a bag, or bags with a ``batch`` vector (a PyG ``Batch``, a
            ``DataLoader`` batch, or a ``Data`` with ``batch``).

    Returns:
        ``(batch [N] or None, B)``: ``None`` and ``1`` for a single bag without ``batch``.

    Shapes:
        - **input:** ``data.batch [N]`` (optional)
        - **output:** ``batch [N]``
    """
    batch = data.get("batch") if hasattr(data, "get") else getattr(data, "batch", None)
    if batch is None:
        return None, 1
    if isinstance(data, Batch):
        return batch, int(data.num_graphs)
    ptr = data.get("ptr") if hasattr(data, "get") else None
    if ptr is not None:
        return batch, int(ptr.numel()) - 1
    return batch, int(batch.max()) + 1 if batch.numel() else 0


def _ptr(counts: Tensor) -> Tensor:
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def refresh_batch_slices(
    data: Batch,
    node: Iterable[str] = (),
    edge: Iterable[str] = (),
    graph: Iterable[str] = (),
    drop: Iterable[str] = (),
    num_bags: Optional[int] = None,
) -> None:
    r"""Rebuild a ``Batch``'s slicing tables after attributes were set or changed in place.

    With :math:`n_b` the instances and :math:`e_b` the edges (by source node) of bag :math:`b`:

    .. math::
        \text{node slices } \pi_b = \sum_{b' < b} n_{b'}, \qquad
        \text{edge slices } \epsilon_b = \sum_{b' < b} e_{b'}, \qquad
        \text{graph slices } b,

    ``edge_index`` gets the increments :math:`\pi_b` (so ``to_data_list`` relabels nodes); every
    other key keeps its increments, or gets 0 when new; ``ptr`` is recomputed. Requires a batch vector sorted by bag (PyG
    batches are) and the edges of each bag stored contiguously in bag order (the edge builders of
    :mod:`graphmil.ops.geometry` sort by ``(row, col)``, so they are). Does nothing on an object
    without slicing tables (a single ``Data``, a ``Batch`` built by hand).

    Args:
        data (Batch): the batch, changed in place.
        node (iterable of str): node-level keys (default ``()``).
        edge (iterable of str): edge-level keys (default ``()``); ``edge_index`` must be set.
        graph (iterable of str): graph-level keys, one entry per bag (default ``()``).
        drop (iterable of str): keys removed from the tables (default ``()``).
        num_bags (int, optional): number of bags ``B`` (default: from ``data``).

    Shapes:
        - **input:** ``data.batch [N]``, ``data.edge_index [2, E]``
    """
    batch, nb = bag_index(data)
    if num_bags is not None:
        nb = int(num_bags)
    if batch is None:
        return
    ptr = _ptr(torch.bincount(batch, minlength=nb))
    if "ptr" in data:
        data.ptr = ptr.to(batch.device)
    slice_dict = getattr(data, "_slice_dict", None)
    inc_dict = getattr(data, "_inc_dict", None)
    if slice_dict is None or inc_dict is None:
        return
    zeros = torch.zeros(nb, dtype=torch.long)
    for key in drop:
        slice_dict.pop(key, None)
        inc_dict.pop(key, None)
    for key in node:
        slice_dict[key] = ptr.cpu()
        inc_dict.setdefault(key, zeros)
    edge = list(edge)
    if edge:
        ei = data.edge_index
        counts = torch.bincount(batch[ei[0]], minlength=nb) if ei.numel() else torch.zeros(nb, dtype=torch.long)
        eptr = _ptr(counts.cpu())
        for key in edge:
            slice_dict[key] = eptr
            if key == "edge_index":
                inc_dict[key] = ptr[:-1].cpu()
            else:
                inc_dict.setdefault(key, zeros)
    for key in graph:
        slice_dict[key] = torch.arange(nb + 1)
        inc_dict.setdefault(key, zeros)
