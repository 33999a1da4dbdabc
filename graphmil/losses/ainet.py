"""AINet's loss terms (Zheng et al.): the consistency term MSE(x, φ(x)) and the region loss."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module
from torch_geometric.utils import scatter

__all__ = ["consistency_loss", "region_loss", "AINetConsistencyLoss", "AINetRegionLoss"]


def consistency_loss(x: Tensor, r: Tensor) -> Tensor:
    r"""AINet's consistency term: the mean squared error between the input and its DAM projection.

    .. math::
        \mathcal{L}_{\text{cons}} = \frac{1}{N D}\sum_{i,d} \big(x_{id} - \phi(x_i)_d\big)^2

    Args:
        x (Tensor): instances ``[N, D]`` (the input of ``φ``).
        r (Tensor): projections ``φ(x)`` ``[N, D]``.
    """
    if x.shape != r.shape:
        raise ValueError(f"consistency_loss: 'x' {tuple(x.shape)} and 'r' {tuple(r.shape)} differ in shape")
    return F.mse_loss(r, x)


def _per_item_loss(logits: Tensor, y: Tensor) -> Tensor:
    if logits.size(1) == 1:
        return F.binary_cross_entropy_with_logits(logits.view(-1), y.view(-1).to(logits.dtype), reduction="none")
    if y.dim() == 2 and y.shape == logits.shape:
        return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), reduction="none").mean(1)
    return F.cross_entropy(logits, y.view(-1).long(), reduction="none")


def region_loss(region_logits: Tensor, y: Tensor, region_batch: Tensor, num_bags: Optional[int] = None) -> Tensor:
    r"""AINet's region term: every region inherits its bag's label.

    .. math::
        \mathcal{L}_{\text{region}} = \frac{1}{B}\sum_b \frac{1}{M_b}\sum_{m \in b}
            \ell\big(\hat y_m, y_b\big)

    with :math:`\ell` the bag task loss (BCE-with-logits for ``C = 1`` or multi-label targets,
    cross-entropy otherwise). With one bag per batch (the paper) it is
    :math:`\operatorname{mean}_m \ell(\hat y_m, y)`.

    Args:
        region_logits (Tensor): ``[R, C]``.
        y (Tensor): bag labels ``[B]`` or ``[B, C]``.
        region_batch (Tensor): bag of each region ``[R]``.
        num_bags (int, optional): ``B``.
    """
    if region_logits.dim() != 2 or region_batch.shape != region_logits.shape[:1]:
        raise ValueError(f"region_loss: expected region_logits [R, C] and region_batch [R], got "
                         f"{tuple(region_logits.shape)} and {tuple(region_batch.shape)}")
    B = int(num_bags) if num_bags is not None else int(region_batch.max()) + 1
    if y.dim() == 2 and y.size(1) == 1:
        y = y.view(-1)
    per_region = _per_item_loss(region_logits, y[region_batch])
    per_bag = scatter(per_region, region_batch, 0, B, reduce="mean")
    return per_bag.mean()


class AINetConsistencyLoss(Module):
    r"""Module form of :func:`consistency_loss`, scaled by ``weight`` (AINet's :math:`\lambda_2`).

    Args:
        weight (float): :math:`\lambda_2` (default ``1.0``).

    Shapes:
        - **input:** ``x [N, D]``, ``r = φ(x) [N, D]``; **output:** a scalar.
    """

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: Tensor, r: Tensor) -> Tensor:
        return self.weight * consistency_loss(x, r)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(weight={self.weight})"


class AINetRegionLoss(Module):
    r"""Module form of :func:`region_loss`, scaled by ``weight`` (AINet's :math:`\lambda_1`).

    Args:
        weight (float): :math:`\lambda_1` (default ``1.0``).

    Shapes:
        - **input:** region logits ``[R, C]``, bag labels ``[B]``, ``region_batch [R]``;
          **output:** a scalar.
    """

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, region_logits: Tensor, y: Tensor, region_batch: Tensor,
                num_bags: Optional[int] = None) -> Tensor:
        return self.weight * region_loss(region_logits, y, region_batch, num_bags)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(weight={self.weight})"
