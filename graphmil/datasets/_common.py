"""Shared helpers of the real-data datasets (data-root resolution, z-scoring transform)."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.transforms import BaseTransform

__all__ = ["resolve_data_root", "ZScore"]


def resolve_data_root(root: Optional[str], who: str) -> str:
    """``root`` if given, else ``$GRAPHMIL_DATA``; a ``ValueError`` saying what to pass otherwise."""
    if root is None:
        root = os.environ.get("GRAPHMIL_DATA")
        if not root:
            raise ValueError(
                f"{who}: no data root: pass root='/path/to/data' (the folder holding the dataset "
                f"folders) or set the GRAPHMIL_DATA environment variable"
            )
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise ValueError(f"{who}: data root '{root}' is not a directory")
    return root


class ZScore(BaseTransform):
    r"""Standardise instance features with fixed statistics: :math:`x' = (x - \mu) / \sigma`.

    The statistics come from training bags only (see ``ClassicMIL.zscore`` and
    ``ColonCancerBags.zscore``), so applying the transform to validation/test bags leaks nothing.
    Features with :math:`\sigma < \text{eps}` are only centred (:math:`\sigma` is set to 1).

    Args:
        mean (Tensor): per-feature mean :math:`\mu` ``[D]``.
        std (Tensor): per-feature standard deviation :math:`\sigma` ``[D]``.
        eps (float, optional): threshold below which a feature counts as constant.
            (default: ``1e-6``)

    Shapes:
        - **input:** ``data.x [N, D]``
        - **output:** ``data.x [N, D]`` float32
    """

    def __init__(self, mean: Tensor, std: Tensor, eps: float = 1e-6) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.shape != std.shape:
            raise ValueError(f"ZScore: 'mean' {tuple(mean.shape)} and 'std' {tuple(std.shape)} differ in shape")
        self.mean = mean
        self.std = torch.where(std < eps, torch.ones_like(std), std)
        self.eps = eps

    @classmethod
    def fit(cls, xs: Sequence[Tensor], eps: float = 1e-6) -> "ZScore":
        """Statistics over all instances of the given feature matrices (population std)."""
        if len(xs) == 0:
            raise ValueError("ZScore.fit: no training bags given")
        x = torch.cat([torch.as_tensor(v, dtype=torch.float64) for v in xs], dim=0)
        return cls(x.mean(0), x.std(0, unbiased=False), eps=eps)

    def forward(self, data: Data) -> Data:
        if data.x.size(-1) != self.mean.numel():
            raise ValueError(
                f"ZScore: bag has {data.x.size(-1)} features, the statistics have {self.mean.numel()}"
            )
        data.x = (data.x - self.mean) / self.std
        return data

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(num_features={self.mean.numel()}, eps={self.eps})"


def as_index_list(idx: Any, n: int, who: str) -> list:
    """An index list / tensor / boolean mask into ``0..n-1`` as a Python list of ints."""
    if isinstance(idx, Tensor):
        idx = idx.cpu().numpy()
    import numpy as np

    arr = np.asarray(idx)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"{who}: boolean mask must have {n} entries, got shape {arr.shape}")
        arr = np.flatnonzero(arr)
    arr = arr.reshape(-1).astype(np.int64)
    if arr.size and (arr.min() < -n or arr.max() >= n):
        raise ValueError(f"{who}: indices out of range 0..{n - 1}")
    return (arr % n).tolist() if arr.size else []
