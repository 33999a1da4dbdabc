"""ACMIL (Zhang et al., ICCV 2023): multi-branch gated attention with STKIM as a registered model."""

from __future__ import annotations

import math
from typing import Dict

import torch
from torch import Tensor
from torch.nn import Linear, Parameter

from graphmil.losses.acmil import DiversityLoss
from graphmil.models.abmil import instance_mlp
from graphmil.models.base import MILModel, bag_task_loss
from graphmil.models.output import MILOutput
from graphmil.models.registry import register_model
from graphmil.nn.aggr.multibranch import MultiBranchAttentionAggregation

__all__ = ["ACMIL"]


@register_model("acmil")
class ACMIL(MILModel):
    r"""ACMIL: gated multi-branch attention, stochastic top-K instance masking (STKIM) and a
    branch-diversity loss (Zhang, Shao, Chen & Kong, "Attention-Challenging Multiple Instance
    Learning for Whole Slide Image Classification", ICCV 2023).

    .. math::
        h_i &= \mathrm{Dropout}(\mathrm{ReLU}(W_e x_i + b_e)), \\
        z_{bm}, z_b &= \text{MultiBranchAttentionAggregation}(h)
        \quad(\text{STKIM in training only}), \\
        \hat y_{bm} &= W_m z_{bm} + \beta_m, \qquad \hat y_b = W_s z_b + \beta_s, \\
        \mathcal L &= \mathcal L_{\mathrm{task}}(\hat y, y)
        + \tfrac1M \textstyle\sum_m \mathcal L_{\mathrm{task}}(\hat y_m, y)
        + w \cdot \mathrm{mean}_{m<l} \cos(a_m, a_l) .

    Instance scores are the attention logits averaged over the branches; ``attention`` is the
    per-branch attention ``[N, M]`` (after STKIM during training), the input of the diversity loss
    and of AEM ("each branch").

    Args:
        in_channels (int): instance feature width ``D``.
        num_classes (int): ``C`` (default ``1``).
        embed_dim (int): embedding width (default ``512``).
        dropout (float): dropout after the embedding (default ``0.0``).
        hidden_channels (int): attention width ``L`` (default ``128``).
        branches (int): ``M`` (default ``5``).
        top_k (int): STKIM ``K`` (default ``10``).
        mask_ratio (float): STKIM ``ρ`` (default ``0.6``).
        diversity_weight (float): ``w`` (default ``1.0``).

    Shapes:
        - **input:** a bag or ``Batch`` with ``x [N, D]``
        - **output:** :class:`MILOutput` with ``bag_logits [B, C]``, ``instance_scores [N]``,
          ``attention [N, M]``, ``extra = {"branch_logits" [B, M, C], "bag_attention" [N]}``
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int = 1,
        embed_dim: int = 512,
        dropout: float = 0.0,
        hidden_channels: int = 128,
        branches: int = 5,
        top_k: int = 10,
        mask_ratio: float = 0.6,
        diversity_weight: float = 1.0,
    ) -> None:
        super().__init__(in_channels, num_classes)
        self.embed = instance_mlp(in_channels, [embed_dim], dropout)
        self.pool = MultiBranchAttentionAggregation(embed_dim, hidden_channels, branches, top_k, mask_ratio)
        self.branch_weight = Parameter(torch.empty(branches, num_classes, embed_dim))
        self.branch_bias = Parameter(torch.empty(branches, num_classes))
        self.slide_classifier = Linear(embed_dim, num_classes)
        self.diversity = DiversityLoss(diversity_weight)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        bound = 1.0 / math.sqrt(self.embed_dim)  # torch.nn.Linear's default init, per branch
        torch.nn.init.uniform_(self.branch_weight, -bound, bound)
        torch.nn.init.uniform_(self.branch_bias, -bound, bound)

    def forward(self, batch) -> MILOutput:
        x, index, num_bags = self.unpack(batch)
        h = self.embed(x)
        out = self.pool.attend(h, index, dim_size=num_bags)
        branch_logits = torch.einsum("bmf,mcf->bmc", out.extra["branch_pooled"], self.branch_weight) + self.branch_bias
        extra = {"branch_logits": branch_logits, "bag_attention": out.extra["bag_attention"]}
        if out.extra["mask"] is not None:
            extra["mask"] = out.extra["mask"]
        return MILOutput(
            bag_logits=self.slide_classifier(out.pooled),
            instance_scores=out.logits.mean(dim=-1),
            attention=out.attention,
            batch=index,
            extra=extra,
        )

    def losses(self, out: MILOutput, batch, epoch: int = 0) -> Dict[str, Tensor]:
        """``{"task", "branches" (mean over branches), "diversity"}`` plus ``out.aux_losses``."""
        num_bags = out.bag_logits.size(0)
        bl = out.extra["branch_logits"]  # [B, M, C]
        y = batch.get("y")
        task = bag_task_loss(out.bag_logits, y)  # validates y (clear error when it is missing)
        y_rep = y.repeat_interleave(self.branches, dim=0)  # rows b*M + m, like bl.reshape(B*M, C)
        terms = {
            "task": task,
            "branches": bag_task_loss(bl.reshape(num_bags * self.branches, -1), y_rep),
            "diversity": self.diversity(out.attention, out.batch, num_bags),
        }
        terms.update(out.aux_losses)
        return terms
