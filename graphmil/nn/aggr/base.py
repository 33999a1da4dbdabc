"""Base class and output type shared by graphmil's attention pools."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch_geometric.nn.aggr import Aggregation

from graphmil.utils import resolve_index

__all__ = ["PoolOutput", "AttentionPool"]


class PoolOutput(NamedTuple):
    """What an attention pool computes in one pass.

    Attributes:
        pooled: bag embeddings ``[B, F]`` (``[B, H, F]`` for ``H > 1`` heads/branches).
        attention: softmaxed attention ``[N]`` (``[N, H]``), summing to 1 within each bag
            (0 for masked instances), aligned with the input order.
        logits: pre-softmax attention logits ``[N]`` (``[N, H]``): the instance scores used for
            localisation.
        index: the bag index ``[N]`` the pool used (from ``index`` or ``ptr``).
        extra: pool-specific tensors (e.g. DSMIL's instance-classifier logits), or ``None``.
    """

    pooled: Tensor
    attention: Tensor
    logits: Tensor
    index: Tensor
    extra: Optional[dict] = None


class AttentionPool(Aggregation):
    """An :class:`~torch_geometric.nn.aggr.Aggregation` that also exposes its attention.

    Subclasses implement :meth:`attend`, which returns a :class:`PoolOutput`; ``forward`` returns
    its ``pooled`` field, so the module drops in wherever a PyG aggregation goes, and
    ``attend(...)`` gives pooled embedding, attention and logits from the *same* pass.

    It takes no constructor arguments itself; subclasses take their own hyperparameters.

    Shapes:
        - **input:** ``x [N, F]``, ``index [N]`` or ``ptr [B+1]``, ``dim_size = B``.
        - **output:** ``forward`` → ``[B, F']``; :meth:`attend` → :class:`PoolOutput`.
    """

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        index: Optional[Tensor] = None,
        ptr: Optional[Tensor] = None,
        dim_size: Optional[int] = None,
        dim: int = -2,
        **kwargs,
    ) -> Tensor:
        return self.attend(x, index=index, ptr=ptr, dim_size=dim_size, dim=dim, **kwargs).pooled

    def attend(
        self,
        x: Tensor,
        index: Optional[Tensor] = None,
        ptr: Optional[Tensor] = None,
        dim_size: Optional[int] = None,
        dim: int = -2,
        **kwargs,
    ) -> PoolOutput:
        raise NotImplementedError

    @staticmethod
    def _prepare(
        x: Tensor,
        index: Optional[Tensor],
        ptr: Optional[Tensor],
        dim_size: Optional[int],
        dim: int,
        name: str,
    ) -> tuple[Tensor, int]:
        if x.dim() != 2 or dim not in (-2, 0):
            raise ValueError(
                f"{name}: expects 2-D input [N, F] pooled over dim -2/0, got shape {tuple(x.shape)} and dim={dim}"
            )
        return resolve_index(x.size(0), index, ptr, dim_size, device=x.device)
