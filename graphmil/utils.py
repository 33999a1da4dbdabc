"""Segment operations over the batch index: the vocabulary every graphmil layer is written in.

A batch holds ``B`` bags concatenated along the instance dimension; ``index`` (PyG's ``batch``)
maps each instance to its bag and ``ptr`` holds the bag boundaries when instances are grouped.
Everything here is vectorised over bags: no Python loop over bags.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor
from torch_geometric.utils import scatter

__all__ = [
    "ptr_to_index",
    "index_to_ptr",
    "resolve_index",
    "segment_softmax",
    "segment_rank",
    "segment_topk",
    "segment_count",
]


def ptr_to_index(ptr: Tensor) -> Tensor:
    """``ptr [B+1]`` → ``index [N]`` (``index[i]`` = bag of instance ``i``)."""
    counts = ptr[1:] - ptr[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=ptr.device), counts)


def index_to_ptr(index: Tensor, dim_size: int) -> Tensor:
    """Sorted ``index [N]`` → ``ptr [dim_size+1]``."""
    counts = torch.bincount(index, minlength=dim_size)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def resolve_index(
    num_items: int,
    index: Optional[Tensor],
    ptr: Optional[Tensor],
    dim_size: Optional[int],
    device: Optional[torch.device] = None,
) -> Tuple[Tensor, int]:
    """Return ``(index, dim_size)`` from whichever of ``index``/``ptr`` was given.

    With neither, all items form one bag. ``dim_size`` defaults to the number of bags implied by
    ``ptr`` or ``index.max() + 1`` (pass it explicitly to avoid a host sync).
    """
    if index is None and ptr is not None:
        if dim_size is not None and dim_size != ptr.numel() - 1:
            raise ValueError(f"'dim_size' ({dim_size}) does not match 'ptr' ({ptr.numel() - 1} bags)")
        if int(ptr[-1]) != num_items:
            raise ValueError(f"'ptr' covers {int(ptr[-1])} items but the input has {num_items}")
        index = ptr_to_index(ptr)
        dim_size = ptr.numel() - 1
    elif index is None:
        index = torch.zeros(num_items, dtype=torch.long, device=device)
    if index.dim() != 1 or index.numel() != num_items:
        raise ValueError(f"'index' must be [N] with N = {num_items}, got shape {tuple(index.shape)}")
    if dim_size is None:
        dim_size = int(index.max()) + 1 if index.numel() > 0 else 0
    return index, int(dim_size)


def segment_count(index: Tensor, dim_size: int) -> Tensor:
    """Number of items per segment, ``[dim_size]``."""
    return torch.bincount(index, minlength=dim_size)[:dim_size]


def segment_softmax(
    src: Tensor,
    index: Tensor,
    dim_size: int,
    mask: Optional[Tensor] = None,
) -> Tensor:
    r"""Numerically stable softmax of ``src`` within each segment, optionally masked.

    .. math::
        a_i = \frac{m_i \exp(s_i - \max_{j: m_j} s_j)}{\sum_{j \in b(i)} m_j \exp(s_j - \max s)}

    Masked items get exactly ``0``; a segment whose items are all masked gets all zeros (never
    NaN); their gradients are zero.

    Args:
        src: logits ``[N]`` or ``[N, H]`` (each column an independent softmax).
        index: segment of each item ``[N]``.
        dim_size: number of segments ``B``.
        mask: optional boolean ``[N]`` or ``[N, H]``; ``False`` drops the item from the softmax.

    Returns:
        Tensor of the shape of ``src``.
    """
    if mask is not None:
        if mask.dim() < src.dim():
            mask = mask.view(-1, *([1] * (src.dim() - 1))).expand_as(src)
        neg = torch.finfo(src.dtype).min
        src = src.masked_fill(~mask, neg)
    src_max = scatter(src.detach(), index, 0, dim_size, reduce="max")
    out = (src - src_max.index_select(0, index)).exp()
    if mask is not None:
        out = out * mask.to(out.dtype)
    denom = scatter(out, index, 0, dim_size, reduce="sum")
    denom = denom.index_select(0, index)
    return out / denom.clamp_min(torch.finfo(out.dtype).tiny)


def segment_rank(score: Tensor, index: Tensor, dim_size: int, descending: bool = True) -> Tensor:
    """Rank of each item within its segment (0 = best), ties broken by original order.

    Args:
        score: ``[N]``.
        index: ``[N]`` segment ids.
        dim_size: number of segments.
        descending: rank 0 is the largest score if ``True``.

    Returns:
        ``LongTensor [N]``.
    """
    n = score.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=score.device)
    perm = torch.sort(score.detach(), descending=descending, stable=True).indices
    perm = perm[torch.sort(index[perm], stable=True).indices]  # by (segment, score), ties by order
    seg = index[perm]
    ptr = index_to_ptr(seg, dim_size)
    rank_sorted = torch.arange(n, device=score.device) - ptr[seg]
    rank = torch.empty_like(rank_sorted)
    rank[perm] = rank_sorted
    return rank


def segment_topk(
    score: Tensor,
    index: Tensor,
    k: Union[int, Tensor],
    dim_size: int,
    largest: bool = True,
) -> Tensor:
    """Boolean mask of the ``k`` highest (or lowest) scores of each segment.

    Segments with fewer than ``k`` items keep all of them. ``k`` may be a tensor ``[dim_size]``
    giving a count per segment. Ties are broken by original order. No gradient flows through the
    selection (it is a hard choice).

    Returns:
        ``BoolTensor [N]``.
    """
    rank = segment_rank(score, index, dim_size, descending=largest)
    if isinstance(k, Tensor):
        return rank < k.to(rank.device)[index]
    return rank < int(k)
