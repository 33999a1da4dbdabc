"""ACMIL multi-branch gated attention with STKIM (Zhang et al., ICCV 2023) as a PyG aggregation."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch_geometric.utils import scatter

from graphmil.nn.aggr.attention import AttentionAggregation
from graphmil.nn.aggr.base import AttentionPool, PoolOutput
from graphmil.nn.masking import stkim_mask
from graphmil.utils import segment_softmax

__all__ = ["MultiBranchAttentionAggregation"]


class MultiBranchAttentionAggregation(AttentionPool):
    r"""Multi-branch gated attention with stochastic top-K instance masking (ACMIL; Zhang, Shao,
    Chen & Kong, "Attention-Challenging Multiple Instance Learning", ICCV 2023).

    Shared gated attention with ``M`` branch vectors :math:`w_m` (columns of :math:`W`):

    .. math::
        e_{im} &= w_m^\top \big(\tanh(V h_i + b_V) \odot \sigma(U h_i + b_U)\big), \\
        \kappa_{im} &= \text{STKIM keep mask (training only, see } \texttt{stkim\_mask}\text{)}, \\
        a_{im} &= \operatorname{softmax}_{j \in b,\ \kappa_{jm}}(e_{jm})_i, \qquad
        z_{bm} = \sum_{i \in b} a_{im} h_i \quad\text{(branch embeddings)}, \\
        \bar a_i &= \tfrac1M \textstyle\sum_m a_{im}, \qquad
        z_b = \sum_{i \in b} \bar a_i h_i \quad\text{(slide embedding)} .

    STKIM (during ``self.training`` only): in every bag and branch, ``⌊min(K, N_b)·ρ⌋`` of the
    ``K`` highest logits are dropped at random from the softmax (never with ``-inf``: a fully
    masked bag gets zero attention, not NaN). As in the authors' code, the slide embedding uses the
    masked branch attention during training. In eval mode no instance is masked.

    Args:
        in_channels (int): feature width ``F``.
        hidden_channels (int): attention width ``L`` (default ``128``).
        branches (int): number of branches ``M`` (default ``5``).
        top_k (int): STKIM candidates ``K`` per bag and branch (default ``10``).
        mask_ratio (float): STKIM fraction ``ρ`` of the candidates masked (default ``0.6``;
            ``0`` disables STKIM).
        dropout (float): dropout on the attention hidden layer (default ``0.0``).

    Shapes:
        - **input:** ``x [N, F]``, ``index [N]`` or ``ptr [B+1]``, optional keep ``mask [N]``.
        - **output:** ``forward`` → slide embedding ``[B, F]``; :meth:`attend` →
          :class:`PoolOutput` with ``pooled [B, F]``, per-branch ``attention`` and ``logits``
          ``[N, M]`` (logits before masking), and ``extra = {"branch_pooled" [B, M, F],
          "bag_attention" [N], "mask" [N, M] or None}``.

    Example:
        >>> pool = MultiBranchAttentionAggregation(16, branches=3)
        >>> out = pool.attend(torch.randn(7, 16), torch.tensor([0, 0, 0, 1, 1, 1, 1]))
        >>> out.pooled.shape, out.attention.shape, out.extra["branch_pooled"].shape
        (torch.Size([2, 16]), torch.Size([7, 3]), torch.Size([2, 3, 16]))
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int = 128,
        branches: int = 5,
        top_k: int = 10,
        mask_ratio: float = 0.6,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if branches < 1:
            raise ValueError(f"MultiBranchAttentionAggregation: 'branches' must be >= 1, got {branches}")
        if top_k < 0:
            raise ValueError(f"MultiBranchAttentionAggregation: 'top_k' must be >= 0, got {top_k}")
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"MultiBranchAttentionAggregation: 'mask_ratio' must be in [0, 1], got {mask_ratio}")
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.branches = branches
        self.top_k = top_k
        self.mask_ratio = mask_ratio
        self.dropout = dropout
        self.attention = AttentionAggregation(in_channels, hidden_channels, gated=True, heads=branches,
                                              dropout=dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.attention.reset_parameters()

    def attend(
        self,
        x: Tensor,
        index: Optional[Tensor] = None,
        ptr: Optional[Tensor] = None,
        dim_size: Optional[int] = None,
        dim: int = -2,
        mask: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> PoolOutput:
        """Pool and return :class:`PoolOutput` from one pass; ``generator`` seeds STKIM."""
        if x.size(-1) != self.in_channels:
            raise ValueError(
                f"MultiBranchAttentionAggregation: expected x with {self.in_channels} features, got {x.size(-1)}"
            )
        index, dim_size = self._prepare(x, index, ptr, dim_size, dim, "MultiBranchAttentionAggregation")
        logits = self.attention.score(x)  # [N, M]
        keep = None
        if self.training and self.top_k > 0 and self.mask_ratio > 0:
            keep = stkim_mask(logits, index, dim_size, self.top_k, self.mask_ratio, generator=generator)
        if mask is not None:
            if mask.dim() != 1 or mask.numel() != x.size(0):
                raise ValueError(
                    f"MultiBranchAttentionAggregation: 'mask' must be [N] with N = {x.size(0)}, got {tuple(mask.shape)}"
                )
            keep = mask.view(-1, 1).expand_as(logits) if keep is None else keep & mask.view(-1, 1)
        att = segment_softmax(logits, index, dim_size, mask=keep)  # [N, M]
        # branch embeddings, one [N, F] product per branch (no [N, M, F] intermediate)
        branch = torch.stack(
            [scatter(att[:, m:m + 1] * x, index, 0, dim_size, reduce="sum") for m in range(self.branches)], dim=1
        )  # [B, M, F]
        bag_att = att.mean(dim=-1)  # [N]
        pooled = branch.mean(dim=1)  # = sum_i bag_att_i h_i (linear in the attention)
        extra = {"branch_pooled": branch, "bag_attention": bag_att, "mask": keep}
        return PoolOutput(pooled, att, logits, index, extra)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, hidden_channels={self.hidden_channels}, "
            f"branches={self.branches}, top_k={self.top_k}, mask_ratio={self.mask_ratio}, "
            f"dropout={self.dropout})"
        )
