"""ABMIL attention pooling (Ilse et al., ICML 2018) as a PyG aggregation."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import Dropout, Linear

from graphmil.nn.aggr.base import AttentionPool, PoolOutput
from graphmil.utils import segment_softmax

__all__ = ["AttentionAggregation"]


class AttentionAggregation(AttentionPool):
    r"""Attention-based MIL pooling, plain or gated (Ilse, Tomczak & Welling, ICML 2018).

    For instance embeddings :math:`h_i \in \mathbb{R}^F` of bag :math:`b`:

    .. math::
        e_i &= w^\top \tanh(V h_i + b_V) \quad\text{(plain)}, \\
        e_i &= w^\top \big(\tanh(V h_i + b_V) \odot \sigma(U h_i + b_U)\big)
              \quad\text{(gated)}, \\
        a_i &= \operatorname{softmax}_{j \in b}(e_j)_i, \qquad z_b = \sum_{i \in b} a_i h_i .

    With ``heads = H > 1``, :math:`w \in \mathbb{R}^{L \times H}` gives ``H`` logits per instance,
    ``H`` independent softmaxes and ``H`` bag embeddings (multi-head / multi-branch attention).
    The softmax is a numerically stable segment softmax over the batch index, so a batch of
    uneven bags is pooled in one pass without padding. ``w`` has no bias (a constant shift does not
    change a softmax).

    Args:
        in_channels (int): feature width ``F`` of the instances.
        hidden_channels (int): attention width ``L`` (default ``128``).
        gated (bool): use the gated form (default ``True``).
        heads (int): number of attention heads/branches ``H`` (default ``1``).
        dropout (float): dropout on the attention hidden layer (default ``0.0``).

    Shapes:
        - **input:** ``x [N, F]``, ``index [N]`` or ``ptr [B+1]``, optional ``mask [N]``
          (``False`` drops an instance from the softmax).
        - **output:** ``forward`` → ``[B, F]`` (``[B, H, F]`` if ``H > 1``);
          :meth:`attend` → :class:`PoolOutput` with attention and logits ``[N]`` (``[N, H]``).

    Example:
        >>> pool = AttentionAggregation(16)
        >>> x, batch = torch.randn(7, 16), torch.tensor([0, 0, 0, 1, 1, 1, 1])
        >>> out = pool.attend(x, batch)
        >>> out.pooled.shape, out.attention.shape
        (torch.Size([2, 16]), torch.Size([7]))
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int = 128,
        gated: bool = True,
        heads: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if heads < 1:
            raise ValueError(f"AttentionAggregation: 'heads' must be >= 1, got {heads}")
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.gated = gated
        self.heads = heads
        self.dropout = dropout
        self.V = Linear(in_channels, hidden_channels)
        self.U = Linear(in_channels, hidden_channels) if gated else None
        self.w = Linear(hidden_channels, heads, bias=False)
        self.drop = Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.V.reset_parameters()
        if self.U is not None:
            self.U.reset_parameters()
        self.w.reset_parameters()

    def score(self, x: Tensor) -> Tensor:
        """Attention logits ``e`` ``[N, H]`` of instance embeddings ``x [N, F]``."""
        h = torch.tanh(self.V(x))
        if self.U is not None:
            h = h * torch.sigmoid(self.U(x))
        return self.w(self.drop(h))

    def attend(
        self,
        x: Tensor,
        index: Optional[Tensor] = None,
        ptr: Optional[Tensor] = None,
        dim_size: Optional[int] = None,
        dim: int = -2,
        mask: Optional[Tensor] = None,
    ) -> PoolOutput:
        """Pool and return :class:`PoolOutput` (pooled, attention, logits) from one pass."""
        if x.size(-1) != self.in_channels:
            raise ValueError(
                f"AttentionAggregation: expected x with {self.in_channels} features, got {x.size(-1)}"
            )
        index, dim_size = self._prepare(x, index, ptr, dim_size, dim, "AttentionAggregation")
        if mask is not None and (mask.size(0) != x.size(0) or mask.dim() > 2):
            raise ValueError(
                f"AttentionAggregation: 'mask' must be [N] or [N, H] with N = {x.size(0)}, got {tuple(mask.shape)}"
            )
        logits = self.score(x)  # [N, H]
        att = segment_softmax(logits, index, dim_size, mask=mask)  # [N, H]
        # one [N, F] product per head (no [N, H, F] broadcast); index_add's backward is an
        # index_select, cheaper than scatter_add_ with a broadcast index and its gather backward
        zeros = x.new_zeros(dim_size, x.size(-1))
        if self.heads == 1:
            pooled = zeros.index_add(0, index, att * x)  # [B, F]
            return PoolOutput(pooled, att.squeeze(-1), logits.squeeze(-1), index)
        pooled = torch.stack([zeros.index_add(0, index, att[:, h:h + 1] * x) for h in range(self.heads)], dim=1)
        return PoolOutput(pooled, att, logits, index)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, hidden_channels={self.hidden_channels}, "
            f"gated={self.gated}, heads={self.heads}, dropout={self.dropout})"
        )
