"""CASii instance losses on the saliency logits (Su et al., 2024)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.utils import scatter

from graphmil.utils import resolve_index, segment_count, segment_topk

__all__ = ["CASiiInstanceLoss"]


class CASiiInstanceLoss(torch.nn.Module):
    r"""CASii's top/bottom instance losses on saliency logits (Su et al., 2024).

    For bag :math:`b` with saliency logits :math:`s_i` (from
    :class:`graphmil.nn.aggr.CASiiAggregation`), :math:`\mathcal{B}_b` = its :math:`\min(r, n_b)`
    lowest and :math:`\mathcal{T}_b` = its :math:`\min(r, n_b)` highest logits (ties by original
    order; they overlap when :math:`n_b < 2r`), and
    :math:`\ell(s, y) = \operatorname{BCEWithLogits}(s, y)`:

    .. math::
        L_{\text{bot},b} = \frac{1}{|\mathcal{B}_b|}\sum_{i\in\mathcal{B}_b} \ell(s_i, 0), \qquad
        L_{\text{top},b} = \frac{1}{|\mathcal{T}_b|}\sum_{i\in\mathcal{T}_b} \ell(s_i, 1), \\
        L = \frac{1}{B'} \sum_{b:\, n_b > 0} \Big(\lambda_{\text{bot}}\, L_{\text{bot},b}
            + \lambda_{\text{top}}\, [Y_b > 0]\, L_{\text{top},b}\Big)

    i.e. the mean over the :math:`B'` non-empty bags of the per-bag loss of the released
    (batch-size-1) code: the bottom term pushes every bag's least salient instances toward
    negative, the top term (positive bags only; a negative bag contributes 0 to it) pushes a
    positive bag's most salient instances toward positive. A bag is positive when its label is
    not 0 (binary, class index ``!= 0`` for multi-class, any nonzero entry for multi-label
    ``[B, C]`` targets). The loss is ``0`` during warm-up, i.e. while ``epoch < warmup_epochs``
    (``epoch`` counts from 0, so the default trains 5 epochs without it). Selection is a segment
    top-k over the batch index (no loop over bags); gradients flow only to the selected logits.

    Args:
        r (int): instances per bag in each term (default ``5``).
        lambda_bot (float): weight :math:`\lambda_1` of the bottom term (default ``0.5``).
        lambda_top (float): weight :math:`\lambda_2` of the top term (default ``0.5``).
        warmup_epochs (int): epochs without the instance losses (default ``5``).

    Shapes:
        - **input:** ``saliency [N]``, ``index [N]``, ``bag_labels [B]`` (or ``[B, 1]``, ``[B, C]``).
        - **output:** scalar.
    """

    def __init__(self, r: int = 5, lambda_bot: float = 0.5, lambda_top: float = 0.5,
                 warmup_epochs: int = 5) -> None:
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"CASiiInstanceLoss: 'r' must be an integer >= 1, got {r!r}")
        if lambda_bot < 0 or lambda_top < 0:
            raise ValueError(f"CASiiInstanceLoss: 'lambda_bot' and 'lambda_top' must be >= 0, got "
                             f"{lambda_bot} and {lambda_top}")
        if warmup_epochs < 0:
            raise ValueError(f"CASiiInstanceLoss: 'warmup_epochs' must be >= 0, got {warmup_epochs}")
        self.r = r
        self.lambda_bot = float(lambda_bot)
        self.lambda_top = float(lambda_top)
        self.warmup_epochs = int(warmup_epochs)

    def reset_parameters(self) -> None:
        """No parameters."""

    def forward(
        self,
        saliency: Tensor,
        index: Optional[Tensor],
        bag_labels: Tensor,
        epoch: int = 0,
        dim_size: Optional[int] = None,
    ) -> Tensor:
        """Instance loss of a batch (see the class docstring); ``0`` while ``epoch < warmup_epochs``."""
        if saliency.dim() != 1:
            raise ValueError(f"CASiiInstanceLoss: 'saliency' must be [N], got {tuple(saliency.shape)}")
        zero = saliency[:0].sum()  # 0 attached to the graph, NaN-free
        if epoch < self.warmup_epochs or saliency.numel() == 0:
            return zero
        if dim_size is None:
            dim_size = bag_labels.size(0)
        index, dim_size = resolve_index(saliency.numel(), index, None, dim_size, device=saliency.device)
        if bag_labels.size(0) != dim_size:
            raise ValueError(f"CASiiInstanceLoss: 'bag_labels' has {bag_labels.size(0)} rows for "
                             f"{dim_size} bags")
        positive = (bag_labels.reshape(dim_size, -1) != 0).any(dim=1).to(saliency.dtype)  # [B]
        count = segment_count(index, dim_size)
        n_sel = count.clamp(max=self.r).clamp_min(1).to(saliency.dtype)  # [B]

        bot = segment_topk(saliency, index, self.r, dim_size, largest=False)
        top = segment_topk(saliency, index, self.r, dim_size, largest=True)
        l_bot = F.binary_cross_entropy_with_logits(saliency, torch.zeros_like(saliency), reduction="none")
        l_top = F.binary_cross_entropy_with_logits(saliency, torch.ones_like(saliency), reduction="none")
        l_bot = scatter(l_bot * bot, index, 0, dim_size, reduce="sum") / n_sel
        l_top = scatter(l_top * top, index, 0, dim_size, reduce="sum") / n_sel
        per_bag = self.lambda_bot * l_bot + self.lambda_top * positive * l_top
        nonempty = (count > 0).to(saliency.dtype)
        return (per_bag * nonempty).sum() / nonempty.sum().clamp_min(1)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(r={self.r}, lambda_bot={self.lambda_bot}, "
                f"lambda_top={self.lambda_top}, warmup_epochs={self.warmup_epochs})")
