r"""Instance masks for attention pools: STKIM (ACMIL), random subsampling, NaN-free logit masking.

Every helper returns a boolean **keep mask** (``True`` = the instance stays in the softmax,
``False`` = it is dropped), the convention of :func:`graphmil.utils.segment_softmax`'s ``mask``
argument. Masks are built with segment operations over the bag index (no Python loop over bags)
and never produce NaN: a bag whose every instance is masked gets all-zero attention from
:func:`~graphmil.utils.segment_softmax` and hence a zero bag embedding.

On the floor under :mod:`graphmil.nn` (the ACMIL pool) and :mod:`graphmil.transforms`
(:class:`~graphmil.transforms.RandomSubsample`); :mod:`graphmil.nn.masking` re-exports these names.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from graphmil.utils import segment_count, segment_rank

__all__ = ["stkim_mask", "random_instance_mask", "mask_logits", "stkim_count"]


def stkim_count(num_instances: Tensor, top_k: int, mask_ratio: float) -> Tensor:
    r"""Number of instances STKIM masks in a bag of ``N_b`` instances.

    .. math::
        c_b = \left\lfloor \min(K, N_b) \cdot \rho \right\rfloor

    (the rule of ACMIL's released code, ``int(min(K, n) * mask_drop)``; a tiny tolerance absorbs
    floating-point error, so ``K = 10, ρ = 0.6`` gives exactly 6).

    Args:
        num_instances: ``LongTensor [B]`` bag sizes ``N_b``.
        top_k (int): ``K``.
        mask_ratio (float): ``ρ`` in ``[0, 1]``.

    Returns:
        ``LongTensor [B]``.

    Shapes:
        - **input:** ``num_instances [B]``
        - **output:** ``[B]``
    """
    kb = num_instances.clamp(max=int(top_k)).to(torch.float64)
    return torch.floor(kb * float(mask_ratio) + 1e-9).to(torch.long)


def _check_ratio(value: float, name: str, fn: str) -> None:
    if not (0.0 <= float(value) <= 1.0) or math.isnan(float(value)):
        raise ValueError(f"{fn}: '{name}' must be in [0, 1], got {value}")


def stkim_mask(
    logits: Tensor,
    index: Tensor,
    dim_size: int,
    top_k: int = 10,
    mask_ratio: float = 0.6,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Stochastic top-K instance masking (STKIM) of ACMIL (Zhang et al., ICCV 2023).

    For every bag :math:`b` and every branch (column) :math:`m` of ``logits``, take the
    :math:`K_b = \min(K, N_b)` instances with the largest logits (ties by input order) and drop a
    uniformly random subset of exactly

    .. math::
        c_b = \lfloor K_b \cdot \rho \rfloor

    of them from the softmax; the draw is independent per branch and per bag. All other instances
    are kept. The returned mask goes to :func:`~graphmil.utils.segment_softmax` (``mask=``), which
    masks without ``-inf`` and so never yields NaN, also when ``ρ = 1`` and ``N_b ≤ K`` drop a
    whole bag (its attention is then all zero).

    Args:
        logits: attention logits ``[N]`` or ``[N, M]`` (``M`` branches).
        index: bag index ``[N]``.
        dim_size (int): number of bags ``B``.
        top_k (int): ``K``, candidates per bag and branch (default ``10``).
        mask_ratio (float): ``ρ``, fraction of the candidates dropped (default ``0.6``).
        generator (torch.Generator, optional): source of randomness (default: the global one).

    Returns:
        ``BoolTensor`` shaped like ``logits``; ``False`` = masked.

    Shapes:
        - **input:** ``logits [N]`` or ``[N, M]``, ``index [N]``
        - **output:** ``[N]`` or ``[N, M]`` (bool)
    """
    if top_k < 0:
        raise ValueError(f"stkim_mask: 'top_k' must be >= 0, got {top_k}")
    _check_ratio(mask_ratio, "mask_ratio", "stkim_mask")
    if logits.dim() not in (1, 2) or logits.size(0) != index.numel():
        raise ValueError(
            f"stkim_mask: 'logits' must be [N] or [N, M] with N = {index.numel()}, got {tuple(logits.shape)}"
        )
    squeeze = logits.dim() == 1
    s = logits.detach().view(logits.size(0), -1)
    n, m = s.shape
    if n == 0 or top_k == 0 or mask_ratio == 0.0:
        return torch.ones_like(logits, dtype=torch.bool)
    # one segment per (bag, branch): seg = index * M + branch, items in row-major order of [N, M]
    seg = (index.view(-1, 1) * m + torch.arange(m, device=index.device)).reshape(-1)
    nseg = dim_size * m
    flat = s.reshape(-1)
    rank = segment_rank(flat, seg, nseg, descending=True)
    cand = rank < top_k
    # random order among the candidates: candidates get U(0,1) priorities, the rest -1
    u = torch.rand(flat.shape, generator=generator, device=flat.device)
    prio = torch.where(cand, u, torch.full_like(u, -1.0))
    rrank = segment_rank(prio, seg, nseg, descending=True)
    count = stkim_count(segment_count(index, dim_size), top_k, mask_ratio)  # [B]
    drop = cand & (rrank < count[index].repeat_interleave(m))
    keep = ~drop.view(n, m)
    return keep.view(-1) if squeeze else keep


def random_instance_mask(
    index: Tensor,
    dim_size: int,
    ratio: float,
    min_instances: int = 1,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Keep a uniformly random subset of :math:`n_b` instances of every bag.

    .. math::
        n_b = \min\big(N_b,\ \max(\lfloor r \cdot N_b \rfloor,\ n_{\min})\big)

    (AEM's subsampling augmentation: random ``⌊rN⌋`` instances per bag per step).

    Args:
        index: bag index ``[N]`` (any order).
        dim_size (int): number of bags ``B``.
        ratio (float): ``r`` in ``[0, 1]``.
        min_instances (int): ``n_min``, lower bound of the kept count (default ``1``).
        generator (torch.Generator, optional): source of randomness.

    Returns:
        ``BoolTensor [N]``, ``True`` = kept.

    Shapes:
        - **input:** ``index [N]``
        - **output:** ``[N]`` (bool)
    """
    _check_ratio(ratio, "ratio", "random_instance_mask")
    if min_instances < 0:
        raise ValueError(f"random_instance_mask: 'min_instances' must be >= 0, got {min_instances}")
    n = index.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=index.device)
    counts = segment_count(index, dim_size)
    keep_n = torch.floor(counts.to(torch.float64) * float(ratio) + 1e-9).to(torch.long)
    keep_n = torch.minimum(keep_n.clamp(min=int(min_instances)), counts)
    u = torch.rand(n, generator=generator, device=index.device)
    rank = segment_rank(u, index, dim_size, descending=True)
    return rank < keep_n[index]


def mask_logits(logits: Tensor, mask: Optional[Tensor]) -> Tensor:
    r"""Replace masked logits by the most negative finite value of their dtype (never ``-inf``).

    .. math::
        \tilde e_i = \begin{cases} e_i & m_i \\ \texttt{finfo.min} & \lnot m_i \end{cases}

    Useful for code that applies its own softmax; prefer
    :func:`~graphmil.utils.segment_softmax` with ``mask=``, which also zeroes a fully masked bag
    (a plain softmax over ``finfo.min`` entries gives a uniform, not a zero, attention).

    Args:
        logits: ``[N]`` or ``[N, H]``.
        mask: boolean keep mask ``[N]`` or shaped like ``logits``; ``None`` returns ``logits``.

    Shapes:
        - **input:** ``logits [N, *]``, ``mask [N]`` or ``[N, *]``
        - **output:** like ``logits``
    """
    if mask is None:
        return logits
    if mask.dim() < logits.dim():
        mask = mask.view(-1, *([1] * (logits.dim() - 1))).expand_as(logits)
    return logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
