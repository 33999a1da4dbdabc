r"""Region partitions of bags: the batched k-d split and batch-unique region ids.

On the floor under :mod:`graphmil.nn` and :mod:`graphmil.transforms`:
:class:`~graphmil.transforms.RegionPartition` (per-bag preprocessing) and the AINet front end
(:class:`~graphmil.nn.anchor.AINetFrontEnd`, on the fly) both use these. Both are vectorised over
the bags of a batch (segment operations, no Python loop over bags).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor
from torch_geometric.data import Batch, Data
from torch_geometric.utils import scatter

from graphmil.utils import segment_count

__all__ = ["kd_partition", "global_region_index"]


# ----------------------------------------------------------------------------------------------
# batched k-d partition (RegionPartition, and on the fly the AINet front end)
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

    Shapes:
        - **input:** ``pos [N, 2]``, ``batch [N]``
        - **output:** ``region [N]``, ``num_regions [B]`` (long)
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


def global_region_index(data: Union[Data, Batch]) -> Tuple[Tensor, int, Tensor]:
    r"""Batch-unique region ids from per-bag ``region`` ids.

    .. math::
        g_i = \rho_i + \sum_{b' < b(i)} M_{b'}

    where :math:`\rho_i` is ``data.region`` and :math:`M_b` is ``data.num_regions`` (a ``[B]``
    vector after PyG batching; inferred as ``max region + 1`` per bag when absent). Works on a
    single bag, on ``Batch.from_data_list`` output and on PyG ``DataLoader`` batches. Ids are
    ordered by ``(bag, region)``.

    Args:
        data (Data or Batch): a bag or a batch with ``region [N]`` (e.g. from
            :class:`~graphmil.transforms.RegionPartition`), optionally ``batch [N]`` (default: one
            bag) and ``num_regions`` (an ``int`` or ``[B]``; default: inferred from ``region``).

    Returns:
        ``(region [N], R, region_batch [R])``: global ids, total number of regions, bag of each
        region.

    Shapes:
        - **input:** ``region [N]``, ``batch [N]``, ``num_regions [B]``
        - **output:** ``region [N]``, ``region_batch [R]``
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
