"""Base class of graphmil's MIL models."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.data import Batch, Data

from graphmil.models.output import MILOutput

__all__ = ["MILModel", "bag_task_loss"]


def bag_task_loss(logits: Tensor, y: Tensor, pos_weight: Tensor | None = None,
                  class_weight: Tensor | None = None) -> Tensor:
    """Bag classification loss: BCE-with-logits when ``C == 1`` (or multi-label float targets
    ``[B, C]``), cross-entropy for ``C > 1`` class indices.

    Args:
        logits: ``[B, C]``.
        y: ``[B]`` labels (0/1 or class index) or ``[B, C]`` multi-label targets.
        pos_weight: optional BCE positive-class weight.
        class_weight: optional CE class weights ``[C]``.
    """
    if logits.dim() != 2:
        raise ValueError(f"bag_task_loss: logits must be [B, C], got {tuple(logits.shape)}")
    if y is None:
        raise ValueError("bag_task_loss: the batch has no bag label 'y' (make_bag(..., y=...))")
    if y.numel() != logits.size(0) and not (y.dim() == 2 and y.shape == logits.shape):
        raise ValueError(f"bag_task_loss: {logits.size(0)} bags but labels of shape {tuple(y.shape)}")
    if logits.size(1) == 1:
        return F.binary_cross_entropy_with_logits(logits.view(-1), y.view(-1).to(logits.dtype),
                                                  pos_weight=pos_weight)
    if y.dim() == 2 and y.shape == logits.shape:
        return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), pos_weight=pos_weight)
    return F.cross_entropy(logits, y.view(-1).long(), weight=class_weight)


class MILModel(torch.nn.Module):
    """Base of every registered model.

    Subclasses implement ``forward(batch) -> MILOutput`` and may override :meth:`losses` to add
    method-specific terms (DSMIL's instance stream, ACMIL branches, CASii instance losses, AINet
    regions). The trainer adds attention entropy (AEM) on ``MILOutput.attention`` when asked.

    Args:
        in_channels (int): instance feature width ``D``.
        num_classes (int): bag output width ``C`` (``1`` = binary with BCE).

    Shapes:
        - **input:** a ``Data`` (one bag) or ``Batch`` with ``x [N, D]`` and ``batch [N]`` (plus
          ``edge_index``/``pos``/``region`` where a model needs them); ``y [B]`` or ``[B, C]`` for
          :meth:`losses`.
        - **output:** :class:`~graphmil.models.MILOutput` (``bag_logits [B, C]``, ``instance_scores [N]``).
    """

    model_name: str = "base"

    def __init__(self, in_channels: int, num_classes: int = 1) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"{type(self).__name__}: in_channels and num_classes must be >= 1, "
                             f"got {in_channels} and {num_classes}")
        self.in_channels = in_channels
        self.num_classes = num_classes

    def unpack(self, batch: Data | Batch):
        """``(x, batch_index, num_bags)`` of a ``Data`` (one bag) or ``Batch``."""
        x = batch.get("x") if hasattr(batch, "get") else getattr(batch, "x", None)
        if x is None:
            raise ValueError("the batch has no 'x' (instance features [N, D])")
        if x.dim() != 2 or x.size(1) != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: expected x [N, {self.in_channels}] (in_channels={self.in_channels}), "
                f"got shape {tuple(x.shape)}"
            )
        index = batch.get("batch")
        if index is None:
            index = torch.zeros(x.size(0), dtype=torch.long, device=x.device)
            num_bags = 1
        else:
            num_bags = int(batch.num_graphs) if hasattr(batch, "num_graphs") else int(index.max()) + 1
        return x, index, num_bags

    def prepare(self, train_bags) -> None:
        """Hook called by the trainer once before fitting, with the bags of the *training split
        only* (an iterable of ``Data``). CASii builds its negative key bank here. Default: nothing."""

    def losses(self, out: MILOutput, batch: Data | Batch, epoch: int = 0) -> Dict[str, Tensor]:
        """Named loss terms for one batch; their sum is minimised. Default: the bag task loss
        plus ``out.aux_losses``."""
        terms = {"task": bag_task_loss(out.bag_logits, batch.y)}
        terms.update(out.aux_losses)
        return terms

    def reset_parameters(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_classes={self.num_classes}"
