"""SmAP: attention-based MIL with the Sm smooth operator (Castro-Macías et al., NeurIPS 2024)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Linear
from torch_geometric.data import Batch, Data

from graphmil.models.base import MILModel
from graphmil.models.output import MILOutput
from graphmil.models.registry import register_model
from graphmil.nn.aggr.sm_attention import SmAttentionAggregation

__all__ = ["SmAP", "graph_of"]


def graph_of(batch: Data | Batch, name: str) -> Tuple[Tensor, Optional[Tensor]]:
    """``(edge_index, edge_weight)`` of a bag/batch, or a ``ValueError`` saying how to add a graph."""
    edge_index = batch.get("edge_index")
    if edge_index is None:
        raise ValueError(
            f"{name}: the batch has no 'edge_index'; Sm needs the spatial graph of each bag: add it "
            "with graphmil.transforms.GridGraph() (e.g. as the dataset's pre_transform/transform)"
        )
    edge_weight = batch.get("edge_weight")
    if edge_weight is not None and edge_weight.dim() != 1:
        raise ValueError(f"{name}: 'edge_weight' must be [E], got shape {tuple(edge_weight.shape)}")
    return edge_index, edge_weight


@register_model("smap")
class SmAP(MILModel):
    r"""SmAP (Castro-Macías et al., "Sm: enhanced localization in multiple instance learning for
    medical imaging classification", NeurIPS 2024): attention pooling with the Sm smooth operator.

    .. math::
        H = \mathrm{GELU}(X W_e + b_e), \qquad
        (z_b, a, e) = \mathrm{SmAP}_{\text{where}}(H;\ \mathcal G), \qquad
        \hat y_b = z_b W_c + b_c,

    with :class:`~graphmil.nn.aggr.SmAttentionAggregation` (Sm early/mid/late over the bag graph
    :math:`\mathcal G` = ``batch.edge_index``, optional ``batch.edge_weight``). Instance scores
    are the attention logits :math:`e`.

    Args:
        in_channels (int): instance feature width ``D``.
        num_classes (int): output width ``C`` (default ``1``).
        embed_dim (int): embedding width (default ``512``).
        hidden_channels (int): attention width (default ``128``).
        where (str): Sm placement ``'early'``, ``'mid'`` or ``'late'`` (default ``'early'``).
        spectral_norm (bool): spectral normalisation after Sm (default ``True``).
        alpha (float): Sm propagation weight (initial if learnable) (default ``0.5``).
        K (int): Sm iterations (default ``10``).
        learn_alpha (bool): learn :math:`\alpha` (default ``True``).
        mode (str): Sm mode ``'approx'`` or ``'exact'`` (default ``'approx'``).
        dropout (float): dropout after the embedding (default ``0.0``).

    Shapes:
        - **input:** a ``Data``/``Batch`` with ``x [N, D]``, ``edge_index [2, E]``, ``batch [N]``.
        - **output:** :class:`~graphmil.models.MILOutput` with ``bag_logits [B, C]``,
          ``instance_scores [N]``, ``attention [N]``, ``batch [N]``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int = 1,
        embed_dim: int = 512,
        hidden_channels: int = 128,
        where: str = "early",
        spectral_norm: bool = True,
        alpha: float = 0.5,
        K: int = 10,
        learn_alpha: bool = True,
        mode: str = "approx",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_channels, num_classes)
        self.embed = Linear(in_channels, embed_dim)
        self.pool = SmAttentionAggregation(embed_dim, hidden_channels, where=where, spectral_norm=spectral_norm,
                                           alpha=alpha, K=K, learn_alpha=learn_alpha, mode=mode)
        self.classifier = Linear(embed_dim, num_classes)

    def forward(self, batch: Data | Batch) -> MILOutput:
        x, index, num_bags = self.unpack(batch)
        edge_index, edge_weight = graph_of(batch, type(self).__name__)
        h = F.dropout(F.gelu(self.embed(x)), self.dropout, self.training)
        out = self.pool.attend(h, index, dim_size=num_bags, edge_index=edge_index, edge_weight=edge_weight)
        return MILOutput(self.classifier(out.pooled), instance_scores=out.logits, attention=out.attention,
                         batch=index)
