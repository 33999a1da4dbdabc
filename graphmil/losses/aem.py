"""AEM: attention entropy maximisation (Zhang et al., "AEM: Attention Entropy Maximization for
Multiple Instance Learning based Whole Slide Image Classification", MICCAI 2025)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch_geometric.utils import scatter

from graphmil.utils import resolve_index

__all__ = ["attention_entropy", "AEMLoss"]


def _per_head_entropy(attention: Tensor, index: Tensor, dim_size: int) -> Tensor:
    a = attention.view(attention.size(0), -1)
    tiny = torch.finfo(a.dtype).tiny
    # a·log a with 0·log 0 = 0 and a finite gradient everywhere (no where(), no log(0))
    plogp = a * torch.log(a.clamp_min(tiny))
    return -scatter(plogp, index, 0, dim_size, reduce="sum")  # [B, H]


def attention_entropy(attention: Tensor, index: Optional[Tensor] = None, dim_size: Optional[int] = None) -> Tensor:
    r"""Shannon entropy (natural log) of the attention of every bag, averaged over heads.

    .. math::
        H_b = -\frac1H \sum_{h=1}^{H} \sum_{i \in b} a_{ih} \log a_{ih}, \qquad 0 \log 0 = 0 .

    Masked instances (attention exactly ``0``) contribute nothing; empty bags (rows of
    ``dim_size`` without instances) and fully masked bags get ``0``. The gradient is finite
    everywhere.

    Args:
        attention: softmaxed attention ``[N]`` or ``[N, H]`` (each column sums to 1 per bag).
        index: bag index ``[N]`` (default: one bag).
        dim_size (int, optional): number of bags ``B`` (default ``index.max() + 1``).

    Returns:
        ``Tensor [B]``.

    Shapes:
        - **input:** ``attention [N]`` or ``[N, H]``, ``index [N]``
        - **output:** ``[B]``
    """
    if attention.dim() not in (1, 2):
        raise ValueError(f"attention_entropy: 'attention' must be [N] or [N, H], got {tuple(attention.shape)}")
    index, dim_size = resolve_index(attention.size(0), index, None, dim_size, device=attention.device)
    return _per_head_entropy(attention, index, dim_size).mean(dim=-1)


class AEMLoss(torch.nn.Module):
    r"""Attention entropy maximisation regulariser (AEM; Zhang et al., MICCAI 2025).

    The negative attention entropy, averaged over the bags of the batch (and over heads /
    branches / classes), times ``λ``:

    .. math::
        \mathcal L_{\mathrm{AEM}} = \frac{\lambda}{|\mathcal B|} \sum_{b \in \mathcal B}
        \frac1H \sum_h \frac{1}{Z_{bh}} \sum_{i \in b} a_{ih} \log a_{ih},
        \qquad Z_{bh} = \begin{cases} 1 & \texttt{normalize=False} \\
        \log N_{bh} & \texttt{normalize=True} \end{cases}

    where :math:`N_{bh}` is the number of *unmasked* instances of bag ``b`` in head ``h`` (from
    ``mask`` if given, else the instances with non-zero attention). For :math:`N_{bh} \le 1` the
    entropy is 0 and so is the normalised term (``0/log 1`` is defined as ``0``). The mean runs over
    the bags :math:`\mathcal B` that have at least one instance in ``index`` (empty rows of
    ``dim_size`` are ignored). Minimising it spreads attention; add it to the task loss
    (``L = L_task + L_AEM``). Paper defaults: ``λ = 0.005`` (CAMELYON16-like binary tasks),
    ``0.1`` (CAMELYON17, LBC).

    Args:
        lam (float): weight ``λ`` (``>= 0``).
        normalize (bool): divide each bag's entropy by ``log N_b`` (default ``False``, as the paper).

    Shapes:
        - **input:** ``attention [N]`` or ``[N, H]``, ``index [N]``, optional keep ``mask`` like
          ``attention`` or ``[N]``
        - **output:** scalar

    Example:
        >>> from graphmil.utils import segment_softmax
        >>> idx = torch.tensor([0, 0, 1, 1, 1])
        >>> a = segment_softmax(torch.randn(5), idx, 2)
        >>> AEMLoss(0.1)(a, idx, 2).shape
        torch.Size([])
    """

    def __init__(self, lam: float, normalize: bool = False) -> None:
        super().__init__()
        if not float(lam) >= 0.0:
            raise ValueError(f"AEMLoss: 'lam' must be >= 0, got {lam}")
        self.lam = float(lam)
        self.normalize = normalize

    def reset_parameters(self) -> None:
        """No parameters (present for interface uniformity)."""

    def forward(
        self,
        attention: Tensor,
        index: Optional[Tensor] = None,
        dim_size: Optional[int] = None,
        mask: Optional[Tensor] = None,
    ) -> Tensor:
        if attention.dim() not in (1, 2):
            raise ValueError(f"AEMLoss: 'attention' must be [N] or [N, H], got {tuple(attention.shape)}")
        index, dim_size = resolve_index(attention.size(0), index, None, dim_size, device=attention.device)
        ent = _per_head_entropy(attention, index, dim_size)  # [B, H]
        if self.normalize:
            a = attention.view(attention.size(0), -1)
            if mask is None:
                kept = a > 0
            else:
                kept = mask.view(mask.size(0), -1).expand_as(a)
            n = scatter(kept.to(a.dtype), index, 0, dim_size, reduce="sum")  # [B, H]
            logn = torch.log(n.clamp_min(1.0))
            ent = torch.where(n > 1, ent / logn.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(ent))
        per_bag = ent.mean(dim=-1)  # [B]
        present = torch.bincount(index, minlength=dim_size)[:dim_size] > 0
        num = present.sum().clamp_min(1).to(per_bag.dtype)
        return -self.lam * (per_bag * present.to(per_bag.dtype)).sum() / num

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(lam={self.lam}, normalize={self.normalize})"
