"""DSMIL dual-stream aggregation (Li, Li & Eliceiri, CVPR 2021) as a PyG aggregation."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.nn import Conv1d, Dropout, Identity, Linear, ReLU, Sequential, Tanh
from torch_geometric.utils import scatter

from graphmil.nn.aggr.base import AttentionPool, PoolOutput
from graphmil.utils import segment_rank, segment_softmax

__all__ = ["DSMILAggregation"]


class DSMILAggregation(AttentionPool):
    r"""Dual-stream MIL pooling of DSMIL (Li, Li & Eliceiri, CVPR 2021).

    For instance embeddings :math:`h_i \in \mathbb{R}^F` of bag :math:`b` and each class
    :math:`k = 1..C`:

    .. math::
        c_{ik} &= W_0 h_i + b_0 \quad\text{(instance classifier, max-instance stream)}, \\
        m_k &= \operatorname{argmax}_{i \in b} c_{ik} \quad\text{(critical instance; ties: first)}, \\
        q_i &= \phi_q(h_i) \in \mathbb{R}^d, \qquad
        s_{ik} = \frac{\langle q_i, q_{m_k} \rangle}{\sqrt d}, \\
        u_{ik} &= \operatorname{softmax}_{j \in b}(s_{jk})_i, \qquad
        z_{bk} = \sum_{i \in b} u_{ik}\, \phi_v(h_i), \\
        \hat y^{\max}_{bk} &= \max_{i \in b} c_{ik}, \qquad
        \hat y^{\mathrm{bag}}_{bk} = \langle w_k, z_{b,:} \rangle + \beta_k
        \quad (w \in \mathbb{R}^{C \times C \times F}: \text{the authors' } \texttt{Conv1d}(C, C, F)).

    :math:`\phi_q` is ``Linear(F, d) → ReLU → Linear(d, d) → tanh`` (``nonlinear=True``, the
    authors' default) or ``Linear(F, d)``; :math:`\phi_v` is the identity or, with
    ``passing_v=True``, ``Dropout → Linear(F, F) → ReLU``. The critical-instance choice is hard (no
    gradient through the argmax); gradients reach :math:`q_{m_k}`. The prediction of the paper's
    code is :math:`0.5\,\hat y^{\max} + 0.5\,\hat y^{\mathrm{bag}}` and its loss
    :math:`0.5\,\mathcal L(\hat y^{\max}) + 0.5\,\mathcal L(\hat y^{\mathrm{bag}})` (see
    :class:`graphmil.models.dsmil.DSMIL`).

    Args:
        in_channels (int): feature width ``F``.
        num_classes (int): number of classes/streams ``C`` (default ``1``).
        query_channels (int): query width ``d`` (default ``128``).
        nonlinear (bool): two-layer tanh query network (default ``True``).
        passing_v (bool): learn the value map :math:`\phi_v` (default ``False``: identity).
        dropout (float): dropout before the value map when ``passing_v`` (default ``0.0``).

    Shapes:
        - **input:** ``x [N, F]``, ``index [N]`` or ``ptr [B+1]``, optional keep ``mask [N]``.
        - **output:** ``forward`` → ``[B, F]`` (``[B, C, F]`` if ``C > 1``); :meth:`attend` →
          :class:`PoolOutput` with attention ``u`` and logits ``s`` ``[N]`` (``[N, C]``) and
          ``extra = {"instance_logits" [N, C], "max_logits" [B, C], "bag_logits" [B, C],
          "critical" [B, C]}`` (``critical`` = row of the critical instance, ``-1`` for an empty
          bag).

    Example:
        >>> pool = DSMILAggregation(16)
        >>> out = pool.attend(torch.randn(7, 16), torch.tensor([0, 0, 0, 1, 1, 1, 1]))
        >>> out.pooled.shape, out.extra["max_logits"].shape
        (torch.Size([2, 16]), torch.Size([2, 1]))
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int = 1,
        query_channels: int = 128,
        nonlinear: bool = True,
        passing_v: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"DSMILAggregation: 'in_channels' must be >= 1, got {in_channels}")
        if num_classes < 1:
            raise ValueError(f"DSMILAggregation: 'num_classes' must be >= 1, got {num_classes}")
        if query_channels < 1:
            raise ValueError(f"DSMILAggregation: 'query_channels' must be >= 1, got {query_channels}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.query_channels = query_channels
        self.nonlinear = nonlinear
        self.passing_v = passing_v
        self.dropout = dropout
        self.instance_classifier = Linear(in_channels, num_classes)
        if nonlinear:
            self.q = Sequential(Linear(in_channels, query_channels), ReLU(),
                                Linear(query_channels, query_channels), Tanh())
        else:
            self.q = Linear(in_channels, query_channels)
        self.v = Sequential(Dropout(dropout), Linear(in_channels, in_channels), ReLU()) if passing_v else Identity()
        self.bag_classifier = Conv1d(num_classes, num_classes, kernel_size=in_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for mod in (self.instance_classifier, self.q, self.v, self.bag_classifier):
            for m in mod.modules():
                if isinstance(m, (Linear, Conv1d)):
                    m.reset_parameters()

    def attend(
        self,
        x: Tensor,
        index: Optional[Tensor] = None,
        ptr: Optional[Tensor] = None,
        dim_size: Optional[int] = None,
        dim: int = -2,
        mask: Optional[Tensor] = None,
    ) -> PoolOutput:
        """Pool and return :class:`PoolOutput` from one pass (see the class docstring).

        A keep ``mask [N]`` removes instances from both streams (max and attention).
        """
        if x.size(-1) != self.in_channels:
            raise ValueError(f"DSMILAggregation: expected x with {self.in_channels} features, got {x.size(-1)}")
        index, dim_size = self._prepare(x, index, ptr, dim_size, dim, "DSMILAggregation")
        if mask is not None and (mask.dim() != 1 or mask.numel() != x.size(0)):
            raise ValueError(f"DSMILAggregation: 'mask' must be [N] with N = {x.size(0)}, got {tuple(mask.shape)}")
        n, c = x.size(0), self.num_classes
        inst = self.instance_classifier(x)  # [N, C]
        # max-instance stream; masked instances never win the max
        inst_m = inst if mask is None else inst.masked_fill(~mask.view(-1, 1), torch.finfo(inst.dtype).min)
        max_logits = scatter(inst_m, index, 0, dim_size, reduce="max")  # [B, C]
        # critical instance of each (bag, class): rank 0 within segment index * C + k
        seg = (index.view(-1, 1) * c + torch.arange(c, device=x.device)).reshape(-1)
        score = inst_m.detach().reshape(-1)
        is_top = segment_rank(score, seg, dim_size * c, descending=True) == 0
        if mask is not None:
            is_top = is_top & mask.repeat_interleave(c)
        rows = torch.arange(n, device=x.device).repeat_interleave(c)
        critical = torch.full((dim_size * c,), -1, dtype=torch.long, device=x.device)
        critical[seg[is_top]] = rows[is_top]
        critical = critical.view(dim_size, c)
        if mask is not None:  # a fully masked bag: report no max (0, like an empty bag)
            has_any = scatter(mask.to(inst.dtype), index, 0, dim_size, reduce="max") > 0
            max_logits = max_logits.masked_fill(~has_any.view(-1, 1), 0.0)

        q = self.q(x)  # [N, d]
        q_crit = q.index_select(0, critical.clamp_min(0).view(-1)).view(dim_size, c, -1)  # [B, C, d]
        logits = torch.einsum("nd,ncd->nc", q, q_crit.index_select(0, index)) / math.sqrt(q.size(-1))
        att = segment_softmax(logits, index, dim_size, mask=mask)  # [N, C]
        v = self.v(x)  # [N, F']
        if c == 1:
            pooled = scatter(att * v, index, 0, dim_size, reduce="sum").unsqueeze(1)  # [B, 1, F]
        else:
            pooled = scatter(att.unsqueeze(-1) * v.unsqueeze(1), index, 0, dim_size, reduce="sum")  # [B, C, F]
        bag_logits = self.bag_classifier(pooled).view(dim_size, c)  # [B, C]
        extra = {"instance_logits": inst, "max_logits": max_logits, "bag_logits": bag_logits, "critical": critical}
        if c == 1:
            return PoolOutput(pooled.squeeze(1), att.squeeze(-1), logits.squeeze(-1), index, extra)
        return PoolOutput(pooled, att, logits, index, extra)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, num_classes={self.num_classes}, "
            f"query_channels={self.query_channels}, nonlinear={self.nonlinear}, "
            f"passing_v={self.passing_v}, dropout={self.dropout})"
        )
