"""SmAP: attention pooling with the Sm smooth operator (Castro-Macías et al., NeurIPS 2024)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.nn import Linear
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm
from torch_geometric.utils import scatter

from graphmil.nn.aggr.base import AttentionPool, PoolOutput
from graphmil.nn.conv.sm import SmConv
from graphmil.utils import segment_softmax

__all__ = ["SmAttentionAggregation"]

_WHERE = ("early", "mid", "late")


def reset_linear(lin: Linear) -> None:
    """Re-initialise a ``Linear`` like ``Linear.reset_parameters``, also when its weight carries a
    spectral-norm parametrisation (then the original weight is re-drawn and the power-iteration
    vectors are re-estimated)."""
    if not parametrize.is_parametrized(lin, "weight"):
        lin.reset_parameters()
        return
    with torch.no_grad():
        original = lin.parametrizations.weight.original
        torch.nn.init.kaiming_uniform_(original, a=math.sqrt(5))
        if lin.bias is not None:
            bound = 1.0 / math.sqrt(original.size(1)) if original.size(1) > 0 else 0.0
            torch.nn.init.uniform_(lin.bias, -bound, bound)
        for p in lin.parametrizations.weight:
            if hasattr(p, "_u") and hasattr(p, "_power_method"):
                p._u.normal_()
                p._v.normal_()
                p._u.copy_(torch.nn.functional.normalize(p._u, dim=0, eps=p.eps))
                p._v.copy_(torch.nn.functional.normalize(p._v, dim=0, eps=p.eps))
                p._power_method(original.flatten(1), 15)


class SmAttentionAggregation(AttentionPool):
    r"""SmAP: attention pooling with the Sm smooth operator (Castro-Macías et al., "Sm: enhanced
    localization in multiple instance learning for medical imaging classification", NeurIPS 2024).

    With :math:`\mathrm{Sm}` the smooth operator of :class:`~graphmil.nn.conv.SmConv` over the
    bag graph(s) (``edge_index``), instance embeddings :math:`H` and bag :math:`b`:

    .. math::
        \text{early:}\quad & \tilde H = \mathrm{Sm}(H), \quad
            e = w^\top \tanh(V \tilde H + b_V), \quad z_b = \sum_{i\in b} a_i \tilde h_i, \\
        \text{mid:}\quad & e = w^\top \tanh\big(\mathrm{Sm}(V H + b_V)\big), \quad
            z_b = \sum_{i\in b} a_i h_i, \\
        \text{late:}\quad & e = \mathrm{Sm}\big(w^\top \tanh(V H + b_V)\big), \quad
            z_b = \sum_{i\in b} a_i h_i, \\
        & a = \operatorname{softmax}_{j \in b}(e_j).

    Plain (ungated) ``tanh`` attention, ``w`` without bias. Spectral normalisation (one power
    iteration per training step, :func:`torch.nn.utils.parametrizations.spectral_norm`) is put on
    the layers right after Sm: ``V`` and ``w`` for *early*, ``w`` for *mid*, none for *late*.
    The softmax is a segment softmax over the batch index, and Sm's batch adjacency is
    block-diagonal, so a batch of uneven bags is pooled in one pass.

    Args:
        in_channels (int): instance feature width ``F``.
        hidden_channels (int): attention width ``L`` (default ``128``).
        where (str): ``'early'``, ``'mid'`` or ``'late'`` (default ``'early'``).
        spectral_norm (bool): spectral normalisation after Sm (default ``True``).
        alpha (float): Sm propagation weight (initial value if learnable) (default ``0.5``).
        K (int): Sm iterations in approx mode (default ``10``).
        learn_alpha (bool): learn Sm's :math:`\alpha` (default ``True``).
        mode (str): Sm mode, ``'approx'`` or ``'exact'`` (default ``'approx'``).
        normalize (bool): Sm normalises the edge weights (default ``True``).
        self_loops_for_isolated (bool): Sm self-loops on degree-0 instances (default ``False``).
        dropout (float): dropout on the attention hidden layer (default ``0.0``).

    Shapes:
        - **input:** ``x [N, F]``, ``index [N]`` or ``ptr [B+1]``, ``edge_index [2, E]`` (required),
          optional ``edge_weight [E]``, optional ``mask [N]``.
        - **output:** ``forward`` → ``[B, F]``; :meth:`attend` → :class:`PoolOutput` with attention
          and logits ``[N]``; ``extra['smoothed']`` holds :math:`\tilde H` for *early*.

    Example:
        >>> pool = SmAttentionAggregation(16, hidden_channels=8)
        >>> x, batch = torch.randn(5, 16), torch.tensor([0, 0, 0, 1, 1])
        >>> edge_index = torch.tensor([[0, 1, 1, 2, 3], [1, 0, 2, 1, 3]])
        >>> pool.attend(x, batch, edge_index=edge_index).pooled.shape
        torch.Size([2, 16])
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int = 128,
        where: str = "early",
        spectral_norm: bool = True,
        alpha: float = 0.5,
        K: int = 10,
        learn_alpha: bool = True,
        mode: str = "approx",
        normalize: bool = True,
        self_loops_for_isolated: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if where not in _WHERE:
            raise ValueError(f"SmAttentionAggregation: 'where' must be one of {_WHERE}, got {where!r}")
        if in_channels < 1 or hidden_channels < 1:
            raise ValueError(
                f"SmAttentionAggregation: 'in_channels' and 'hidden_channels' must be >= 1, "
                f"got {in_channels} and {hidden_channels}"
            )
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.where = where
        self.spectral_norm = spectral_norm
        self.alpha = alpha
        self.K = K
        self.learn_alpha = learn_alpha
        self.mode = mode
        self.normalize = normalize
        self.self_loops_for_isolated = self_loops_for_isolated
        self.dropout = dropout
        self.sm = SmConv(alpha=alpha, K=K, learn_alpha=learn_alpha, mode=mode, normalize=normalize,
                         self_loops_for_isolated=self_loops_for_isolated)
        self.V = Linear(in_channels, hidden_channels)
        self.w = Linear(hidden_channels, 1, bias=False)
        if spectral_norm:
            if where == "early":
                _spectral_norm(self.V)
            if where in ("early", "mid"):
                _spectral_norm(self.w)
        self.drop = torch.nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.sm.reset_parameters()
        reset_linear(self.V)
        reset_linear(self.w)

    def attend(  # type: ignore[override]
        self,
        x: Tensor,
        index: Optional[Tensor] = None,
        ptr: Optional[Tensor] = None,
        dim_size: Optional[int] = None,
        dim: int = -2,
        edge_index: Optional[Tensor] = None,
        edge_weight: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
    ) -> PoolOutput:
        """Pool and return :class:`PoolOutput` (pooled, attention, logits) from one pass."""
        if edge_index is None:
            raise ValueError(
                "SmAttentionAggregation: 'edge_index' is required (Sm smooths over the bag graph); "
                "build one with graphmil.transforms.GridGraph()"
            )
        if x.dim() == 2 and x.size(-1) != self.in_channels:
            raise ValueError(
                f"SmAttentionAggregation: expected x with {self.in_channels} features, got {x.size(-1)}"
            )
        index, dim_size = self._prepare(x, index, ptr, dim_size, dim, "SmAttentionAggregation")
        extra = None
        if self.where == "early":
            h = self.sm(x, edge_index, edge_weight, index)
            logits = self.w(self.drop(torch.tanh(self.V(h)))).squeeze(-1)
            extra = {"smoothed": h}
        elif self.where == "mid":
            h = x
            logits = self.w(self.drop(torch.tanh(self.sm(self.V(x), edge_index, edge_weight, index)))).squeeze(-1)
        else:
            h = x
            logits = self.sm(self.w(self.drop(torch.tanh(self.V(x)))), edge_index, edge_weight, index).squeeze(-1)
        att = segment_softmax(logits, index, dim_size, mask=mask)
        pooled = scatter(att.unsqueeze(-1) * h, index, 0, dim_size, reduce="sum")
        return PoolOutput(pooled, att, logits, index, extra)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, hidden_channels={self.hidden_channels}, "
            f"where={self.where!r}, spectral_norm={self.spectral_norm}, alpha={self.alpha}, K={self.K}, "
            f"learn_alpha={self.learn_alpha}, mode={self.mode!r}, dropout={self.dropout})"
        )
