"""The one typed output every graphmil model returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from torch import Tensor

__all__ = ["MILOutput"]


@dataclass
class MILOutput:
    """What ``model(batch)`` returns; losses, metrics, AEM and heatmaps all read this.

    Attributes:
        bag_logits: ``[B, C]`` bag logits (``C = 1`` for binary tasks trained with BCE).
        instance_scores: ``[N]`` instance scores for localisation (attention logits for attention
            models, instance-classifier logits for DSMIL, max-pooled logits for ``maxmil``).
        attention: softmaxed attention ``[N]`` or ``[N, H]`` (heads/branches), or ``None`` for
            models without attention.
        batch: ``[N]`` bag index of the rows of ``instance_scores``/``attention``.
        aux_losses: named auxiliary loss terms already weighted by the model's own coefficients
            (e.g. ``{"consistency": ...}``); the trainer adds them to the task loss.
        extra: anything else a model exposes (region logits, branch logits, kept-instance mask).
    """

    bag_logits: Tensor
    instance_scores: Optional[Tensor] = None
    attention: Optional[Tensor] = None
    batch: Optional[Tensor] = None
    aux_losses: Dict[str, Tensor] = field(default_factory=dict)
    extra: Dict[str, Tensor] = field(default_factory=dict)
