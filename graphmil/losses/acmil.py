"""ACMIL's branch-diversity loss (Zhang, Shao, Chen & Kong, ICCV 2023)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch_geometric.utils import scatter

from graphmil.utils import resolve_index

__all__ = ["attention_diversity", "DiversityLoss"]


def attention_diversity(
    attention: Tensor, index: Optional[Tensor] = None, dim_size: Optional[int] = None, eps: float = 1e-8
) -> Tensor:
    r"""Mean pairwise cosine similarity of the branch attention vectors of each bag.

    .. math::
        d_b = \frac{2}{M(M-1)} \sum_{m < l}
        \frac{\sum_{i \in b} a_{im} a_{il}}{\max\big(\|a_{\cdot m}\|_b \, \|a_{\cdot l}\|_b,\ \varepsilon\big)},
        \qquad \|a_{\cdot m}\|_b = \Big(\sum_{i \in b} a_{im}^2\Big)^{1/2}

    computed for all bags at once from the per-bag Gram matrices
    :math:`G_b = \sum_{i \in b} a_i a_i^\top` (``[B, M, M]``). ``M = 1`` and empty bags give 0.

    Args:
        attention: branch attention ``[N, M]``.
        index: bag index ``[N]`` (default: one bag).
        dim_size (int, optional): number of bags ``B``.
        eps (float): ``ε`` (default ``1e-8``, as ``torch.cosine_similarity``).

    Returns:
        ``Tensor [B]``.

    Shapes:
        - **input:** ``attention [N, M]``, ``index [N]``
        - **output:** ``[B]``
    """
    if attention.dim() != 2:
        raise ValueError(f"attention_diversity: 'attention' must be [N, M], got {tuple(attention.shape)}")
    index, dim_size = resolve_index(attention.size(0), index, None, dim_size, device=attention.device)
    m = attention.size(1)
    if m < 2:
        return attention.new_zeros(dim_size) + 0.0 * attention.sum()
    gram = scatter(attention.unsqueeze(2) * attention.unsqueeze(1), index, 0, dim_size, reduce="sum")  # [B, M, M]
    norm = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()  # [B, M]
    cos = gram / (norm.unsqueeze(2) * norm.unsqueeze(1)).clamp_min(eps)
    iu = torch.triu_indices(m, m, offset=1, device=attention.device)
    return cos[:, iu[0], iu[1]].mean(dim=-1)


class DiversityLoss(torch.nn.Module):
    r"""ACMIL's multi-branch diversity loss (Zhang et al., ICCV 2023): the mean over branch pairs
    of the cosine similarity of their attention within a bag, averaged over the bags.

    .. math::
        \mathcal L_{\mathrm{div}} = \frac{w}{|\mathcal B|} \sum_{b \in \mathcal B}
        \frac{2}{M(M-1)} \sum_{m<l} \cos\big(a^{(b)}_{\cdot m}, a^{(b)}_{\cdot l}\big)

    (:func:`attention_diversity` per bag; the mean runs over bags with at least one instance).
    The authors compute it on the softmax of the *masked* logits, i.e. the attention the model
    pooled with.

    Args:
        weight (float): ``w`` (default ``1.0``, as ACMIL).
        eps (float): cosine denominator floor (default ``1e-8``).

    Shapes:
        - **input:** ``attention [N, M]``, ``index [N]``
        - **output:** scalar
    """

    def __init__(self, weight: float = 1.0, eps: float = 1e-8) -> None:
        super().__init__()
        if not float(weight) >= 0:
            raise ValueError(f"DiversityLoss: 'weight' must be >= 0, got {weight}")
        self.weight = float(weight)
        self.eps = float(eps)

    def reset_parameters(self) -> None:
        """No parameters (present for interface uniformity)."""

    def forward(self, attention: Tensor, index: Optional[Tensor] = None, dim_size: Optional[int] = None) -> Tensor:
        if attention.dim() != 2:
            raise ValueError(f"DiversityLoss: 'attention' must be [N, M], got {tuple(attention.shape)}")
        index, dim_size = resolve_index(attention.size(0), index, None, dim_size, device=attention.device)
        d = attention_diversity(attention, index, dim_size, self.eps)
        present = (torch.bincount(index, minlength=dim_size)[:dim_size] > 0).to(d.dtype)
        return self.weight * (d * present).sum() / present.sum().clamp_min(1)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(weight={self.weight}, eps={self.eps})"
