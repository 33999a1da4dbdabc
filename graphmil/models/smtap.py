"""SmTAP: Sm transformer + SmAP (Castro-Macías et al., NeurIPS 2024)."""

from __future__ import annotations

import torch.nn.functional as F
from torch.nn import Linear
from torch_geometric.data import Batch, Data

from graphmil.models.base import MILModel
from graphmil.models.output import MILOutput
from graphmil.models.registry import register_model
from graphmil.models.smap import graph_of
from graphmil.nn.aggr.attention import AttentionAggregation
from graphmil.nn.aggr.sm_attention import SmAttentionAggregation
from graphmil.nn.transformer import SmTransformerEncoder

__all__ = ["SmTAP"]


@register_model("smtap")
class SmTAP(MILModel):
    r"""SmTAP (Castro-Macías et al., "Sm: enhanced localization in multiple instance learning for
    medical imaging classification", NeurIPS 2024, eq. 13): a bag-local transformer whose
    attention outputs are smoothed by Sm, followed by SmAP.

    .. math::
        H = \mathrm{GELU}(X W_e + b_e), \quad
        Z = \mathrm{SmTransformerEncoder}(H;\ \mathcal G), \quad
        (z_b, a, e) = \mathrm{SmAP}_{\text{where}}(Z;\ \mathcal G), \quad
        \hat y_b = z_b W_c + b_c .

    ``sm_transformer=False`` / ``sm_pool=False`` give the paper's ablations (T+SmAP, SmT+AP,
    T+AP; AP = plain tanh attention pooling without Sm).

    Args:
        in_channels (int): instance feature width ``D``.
        num_classes (int): output width ``C`` (default ``1``).
        embed_dim (int): embedding/transformer width (default ``512``).
        hidden_channels (int): attention-pool width (default ``128``).
        where (str): Sm placement in the pool (default ``'early'``).
        heads (int): transformer heads (default ``8``).
        num_layers (int): transformer layers (default ``2``).
        spectral_norm (bool): spectral normalisation after Sm in the pool (default ``True``).
        alpha (float): Sm propagation weight (initial if learnable) (default ``0.5``).
        K (int): Sm iterations (default ``10``).
        learn_alpha (bool): learn each Sm's :math:`\alpha` (default ``True``).
        mode (str): Sm mode (default ``'approx'``).
        sm_transformer (bool): use Sm in the transformer (default ``True``).
        sm_pool (bool): use SmAP (else plain attention pooling) (default ``True``).
        dropout (float): dropout after the embedding and in attention (default ``0.0``).

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
        heads: int = 8,
        num_layers: int = 2,
        spectral_norm: bool = True,
        alpha: float = 0.5,
        K: int = 10,
        learn_alpha: bool = True,
        mode: str = "approx",
        sm_transformer: bool = True,
        sm_pool: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_channels, num_classes)
        self.embed = Linear(in_channels, embed_dim)
        self.encoder = SmTransformerEncoder(embed_dim, heads, num_layers, dropout=dropout, use_sm=sm_transformer,
                                            alpha=alpha, K=K, learn_alpha=learn_alpha, mode=mode)
        if sm_pool:
            self.pool = SmAttentionAggregation(embed_dim, hidden_channels, where=where, spectral_norm=spectral_norm,
                                               alpha=alpha, K=K, learn_alpha=learn_alpha, mode=mode)
        else:
            self.pool = AttentionAggregation(embed_dim, hidden_channels, gated=False)
        self.classifier = Linear(embed_dim, num_classes)

    def forward(self, batch: Data | Batch) -> MILOutput:
        x, index, num_bags = self.unpack(batch)
        needs_graph = self.sm_transformer or self.sm_pool
        edge_index, edge_weight = graph_of(batch, type(self).__name__) if needs_graph else (None, None)
        h = F.dropout(F.gelu(self.embed(x)), self.dropout, self.training)
        z = self.encoder(h, edge_index, index, dim_size=num_bags, edge_weight=edge_weight)
        if self.sm_pool:
            out = self.pool.attend(z, index, dim_size=num_bags, edge_index=edge_index, edge_weight=edge_weight)
        else:
            out = self.pool.attend(z, index, dim_size=num_bags)
        return MILOutput(self.classifier(out.pooled), instance_scores=out.logits, attention=out.attention,
                         batch=index)
