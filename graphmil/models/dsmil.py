"""DSMIL (Li, Li & Eliceiri, CVPR 2021): dual-stream MIL as a registered graphmil model."""

from __future__ import annotations

from typing import Dict

from torch import Tensor
from torch.nn import Linear

from graphmil.models.abmil import instance_mlp
from graphmil.models.base import MILModel, bag_task_loss
from graphmil.models.output import MILOutput
from graphmil.models.registry import register_model
from graphmil.nn.aggr.dsmil import DSMILAggregation

__all__ = ["DSMIL"]


@register_model("dsmil")
class DSMIL(MILModel):
    r"""DSMIL: instance embedding, max-instance stream and critical-instance attention stream
    (Li, Li & Eliceiri, "Dual-stream Multiple Instance Learning Network for Whole Slide Image
    Classification with Self-supervised Contrastive Learning", CVPR 2021).

    .. math::
        h_i &= \mathrm{Dropout}(\mathrm{ReLU}(W_e x_i + b_e)), \\
        \hat y &= \tfrac12\,\hat y^{\max} + \tfrac12\,\hat y^{\mathrm{bag}}
        \quad\text{(see } \texttt{DSMILAggregation}\text{)}, \\
        \mathcal L &= \tfrac12\,\mathcal L_{\mathrm{task}}(\hat y^{\max}, y)
        + \tfrac12\,\mathcal L_{\mathrm{task}}(\hat y^{\mathrm{bag}}, y) .

    Instance scores are the instance-classifier logits :math:`c_i` of the positive class
    (``C = 1``: the only column; ``C >= 2``: the maximum over the classes ``1..C-1``, i.e. class 1
    when ``C = 2``); the attention is :math:`u` (``[N]``, or ``[N, C]`` for ``C > 1``: one critical
    instance per class).

    Args:
        in_channels (int): instance feature width ``D``.
        num_classes (int): ``C`` (default ``1``, binary with BCE).
        embed_dim (int): embedding width (default ``512``).
        dropout (float): dropout after the embedding (default ``0.0``).
        query_channels (int): query width ``d`` (default ``128``).
        nonlinear (bool): two-layer tanh query network (default ``True``).
        passing_v (bool): learned value map (default ``False``).

    Shapes:
        - **input:** a bag or ``Batch`` with ``x [N, D]``
        - **output:** :class:`MILOutput` with ``bag_logits [B, C]``, ``instance_scores [N]``,
          ``attention [N]`` (``[N, C]``), ``extra = {"max_logits", "bag_stream_logits" [B, C],
          "instance_logits" [N, C]}``
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int = 1,
        embed_dim: int = 512,
        dropout: float = 0.0,
        query_channels: int = 128,
        nonlinear: bool = True,
        passing_v: bool = False,
    ) -> None:
        super().__init__(in_channels, num_classes)
        self.embed = instance_mlp(in_channels, [embed_dim], dropout)
        self.pool = DSMILAggregation(embed_dim, num_classes, query_channels, nonlinear, passing_v, dropout)

    def forward(self, batch) -> MILOutput:
        x, index, num_bags = self.unpack(batch)
        h = self.embed(x)
        out = self.pool.attend(h, index, dim_size=num_bags)
        max_logits, bag_logits = out.extra["max_logits"], out.extra["bag_logits"]
        inst = out.extra["instance_logits"]
        scores = inst[:, 0] if self.num_classes == 1 else inst[:, 1:].max(dim=-1).values
        return MILOutput(
            bag_logits=0.5 * (max_logits + bag_logits),
            instance_scores=scores,
            attention=out.attention,
            batch=index,
            extra={"max_logits": max_logits, "bag_stream_logits": bag_logits, "instance_logits": inst,
                   "critical": out.extra["critical"]},
        )

    def losses(self, out: MILOutput, batch, epoch: int = 0) -> Dict[str, Tensor]:
        """``{"task_max": 0.5·L(ŷ_max), "task_bag": 0.5·L(ŷ_bag)}`` plus ``out.aux_losses``."""
        terms = {
            "task_max": 0.5 * bag_task_loss(out.extra["max_logits"], batch.y),
            "task_bag": 0.5 * bag_task_loss(out.extra["bag_stream_logits"], batch.y),
        }
        terms.update(out.aux_losses)
        return terms
