"""AINet: anchor instances over spatial regions (Zheng et al.) as a graphmil model."""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Dropout, Linear, ReLU, Sequential

from graphmil.losses.ainet import region_loss
from graphmil.models.base import MILModel, bag_task_loss
from graphmil.models.output import MILOutput
from graphmil.models.registry import register_model
from graphmil.nn.aggr.attention import AttentionAggregation
from graphmil.nn.anchor import AINetFrontEnd

__all__ = ["AINet"]


@register_model("ainet")
class AINet(MILModel):
    r"""AINet: dual-level anchor mining and anchor-guided region correction (Zheng et al.).

    .. math::
        h &= x \ \text{(or } \mathrm{ReLU}(W_e x) \text{ with } \texttt{embed\_dim}), \qquad
        r = \phi(h), \qquad \hat r = \mathrm{ARC}(r, \mathrm{DAM}(r)), \\
        e_i &= w^\top\big(\tanh(V \hat r_i) \odot \sigma(U \hat r_i)\big), \qquad
        \mathcal{K} = \mathrm{mask}_\rho(e) \ \text{(top } \lceil(1-\rho) n_m\rceil \text{ per region)}, \\
        z_b &= \sum_{i \in b \cap \mathcal{K}} \operatorname{softmax}(e)_i\, \hat r_i, \quad
        z_m = \sum_{i \in R_m \cap \mathcal{K}} \operatorname{softmax}(e)_i\, \hat r_i, \quad
        \hat y_b = W_c z_b + c, \quad \hat y_m = W_c z_m + c, \\
        \mathcal{L} &= \ell(\hat y_b, y_b) + \lambda_1 \frac{1}{M}\sum_m \ell(\hat y_m, y_b)
              + \lambda_2\, \mathrm{MSE}(h, \phi(h)) .

    One gated attention module scores the instances for masking, pools the bag and (with
    ``share_attention=True``, default) the regions; the classifier is shared by bag and regions.
    Regions come from ``batch.region``/``batch.num_regions``
    (:class:`~graphmil.transforms.RegionPartition`), or, when the batch has no ``region``, from the
    batched k-d split of ``batch.pos`` (:func:`~graphmil.transforms.kd_partition`).

    Output: ``instance_scores [N]`` are the gated-attention logits :math:`e_i` of **all** input
    instances (dropped instances included: masking drops the lowest of them per region);
    ``attention [N]`` is the bag softmax over kept instances (``0`` for dropped ones);
    ``extra`` holds ``region_logits [R, C]``, ``region_batch [R]``, ``region [N]`` (global ids),
    ``keep [N]`` and ``anchor_index [A]``; ``aux_losses`` holds ``consistency``
    (:math:`\lambda_2`-weighted). :meth:`losses` adds ``task`` and ``region``.

    Args:
        in_channels (int): ``D``.
        num_classes (int): ``C`` (default ``1``).
        num_regions (int): regions per bag for on-the-fly partitions (default ``8``).
        beta (float): DAM region weight (default ``0.7``).
        heads (int): ARC heads (default ``8``; must divide the feature width).
        rho (float): masked fraction per region (default ``0.3``).
        neighbour (str or None): ARC neighbour, ``'next'`` (default), ``'graph'``, ``None`` (ACF).
        anchors (str): ``'region'`` (default) or ``'topk'``.
        k (int, optional): anchors per bag for ``'topk'``.
        embed_dim (int, optional): reduce ``D`` to this width with ``Linear + ReLU`` first
            (default ``None``: ``φ`` works on ``D`` as in the paper; use e.g. ``512`` for 1024-d
            features to cut ARC's cost).
        attention_dim (int): gated attention width ``L`` (default ``128``).
        dropout (float): dropout after the embedding and in ARC's attention (default ``0.0``).
        lambda_region (float): :math:`\lambda_1` (default ``1.0``).
        lambda_consistency (float): :math:`\lambda_2` (default ``1.0``).
        share_attention (bool): one attention for bag and region pooling (default ``True``).
        min_region_size (int): smallest on-the-fly region (default ``1``).

    Shapes:
        - **input:** a ``Data``/``Batch`` with ``x [N, D]``, ``batch [N]``, and ``region [N]`` (from
          :class:`~graphmil.transforms.RegionPartition`) or ``pos [N, 2]`` to partition on the fly.
        - **output:** :class:`~graphmil.models.MILOutput` with ``bag_logits [B, C]``,
          ``instance_scores [N]``, ``attention [N]`` (0 for masked instances), ``batch [N]``,
          ``extra['region_logits'] [R, C]``, ``extra['region_batch'] [R]``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int = 1,
        num_regions: int = 8,
        beta: float = 0.7,
        heads: int = 8,
        rho: float = 0.3,
        neighbour: Optional[str] = "next",
        anchors: str = "region",
        k: Optional[int] = None,
        embed_dim: Optional[int] = None,
        attention_dim: int = 128,
        dropout: float = 0.0,
        lambda_region: float = 1.0,
        lambda_consistency: float = 1.0,
        share_attention: bool = True,
        min_region_size: int = 1,
    ) -> None:
        super().__init__(in_channels, num_classes)
        width = in_channels if embed_dim is None else int(embed_dim)
        if width < 1:
            raise ValueError(f"AINet: 'embed_dim' must be >= 1, got {embed_dim}")
        if heads < 1 or width % heads != 0:
            raise ValueError(f"AINet: the feature width {width} must be divisible by 'heads' ({heads}); "
                             f"set 'embed_dim' to a multiple of heads")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"AINet: 'dropout' must be in [0, 1), got {dropout}")
        if embed_dim is None:
            self.embed = None
        else:
            layers = [Linear(in_channels, width), ReLU()]
            if dropout > 0:
                layers.append(Dropout(dropout))
            self.embed = Sequential(*layers)
        self.pool = AttentionAggregation(width, attention_dim, gated=True)
        self.region_pool = self.pool if share_attention else AttentionAggregation(width, attention_dim, gated=True)
        self.front_end = AINetFrontEnd(
            width, num_regions=num_regions, beta=beta, heads=heads, rho=rho, neighbour=neighbour,
            anchors=anchors, k=k, dropout=dropout, hidden_channels=attention_dim, scorer=self.pool,
            min_region_size=min_region_size,
        )
        self.classifier = Linear(width, num_classes)
        self.reset_parameters()

    def forward(self, batch) -> MILOutput:
        x, index, num_bags = self.unpack(batch)
        h = x if self.embed is None else self.embed(x)
        region, R = None, None
        if batch.get("region") is not None:
            from graphmil.transforms.regions import global_region_index

            region, R, _ = global_region_index(batch)
        elif batch.get("pos") is None:
            raise ValueError("AINet: the batch has neither 'region' nor 'pos' to build regions from")
        fe = self.front_end(h, index, region=region, pos=batch.get("pos"),
                            edge_index=batch.get("edge_index"), dim_size=num_bags, num_regions=R)
        R = fe.aux["region_batch"].numel()
        bag = self.pool.attend(fe.x, fe.batch, dim_size=num_bags)
        reg = self.region_pool.attend(fe.x, fe.region, dim_size=R)
        attention = h.new_zeros(h.size(0))
        attention[fe.keep_index] = bag.attention
        return MILOutput(
            bag_logits=self.classifier(bag.pooled),
            instance_scores=fe.aux["logits"],
            attention=attention,
            batch=index,
            aux_losses={"consistency": self.lambda_consistency * F.mse_loss(fe.aux["r"], h)},
            extra={"region_logits": self.classifier(reg.pooled), "region_batch": fe.aux["region_batch"],
                   "region": fe.aux["region"], "keep": fe.aux["keep"],
                   "anchor_index": fe.aux["anchor_index"]},
        )

    def losses(self, out: MILOutput, batch, epoch: int = 0) -> Dict[str, Tensor]:
        """``task`` (bag loss), ``region`` (:math:`\\lambda_1` · mean region loss) and
        ``consistency`` (:math:`\\lambda_2` · MSE)."""
        y = batch.y
        terms = {"task": bag_task_loss(out.bag_logits, y)}
        terms["region"] = self.lambda_region * region_loss(
            out.extra["region_logits"], y, out.extra["region_batch"], out.bag_logits.size(0))
        terms.update(out.aux_losses)
        return terms
