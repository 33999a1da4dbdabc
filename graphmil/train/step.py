r"""One optimisation step, written once: :func:`train_step` (the engine and the benchmarks call it).

Every step minimises

.. math::
    L = \sum_t L_t(\text{model.losses}(out, batch, epoch)) + \lambda\, L_{AEM}(a)

with the terms of the model's :meth:`~graphmil.models.MILModel.losses` (task loss + the method's
own terms) and AEM on ``out.attention`` when an :class:`~graphmil.losses.AEMLoss` is given.
The optimiser and the learning-rate schedule come from ``torch.optim`` and
``torch.optim.lr_scheduler``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from graphmil.train.config import TrainConfig

__all__ = ["StepResult", "train_step", "loss_terms", "build_optimizer", "build_scheduler",
           "lr_factor", "class_weights"]


@dataclass
class StepResult:
    """What :func:`train_step` returns: the total ``loss`` and each named term (floats, detached)
    and the number of bags ``num_bags`` of the batch."""

    loss: float
    terms: Dict[str, float]
    num_bags: int


def loss_terms(model: torch.nn.Module, out, batch, epoch: int = 0, aem=None,
               pos_weight: Optional[Tensor] = None, class_weight: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """The named loss terms of one batch: ``model.losses(out, batch, epoch)``, its ``task`` term
    re-weighted by ``pos_weight`` / ``class_weight`` when given, plus ``aem`` on ``out.attention``.

    Raises:
        ValueError: ``aem`` given for a model without attention.
    """
    from graphmil.models.base import bag_task_loss

    module = getattr(model, "module", model)
    terms = dict(module.losses(out, batch, epoch))
    if pos_weight is not None or class_weight is not None:
        if "task" in terms:
            terms["task"] = bag_task_loss(out.bag_logits, batch.y, pos_weight=pos_weight,
                                          class_weight=class_weight)
        else:
            warnings.warn(f"class_weights: {type(module).__name__}.losses has no 'task' term; "
                          "class weights are not applied", UserWarning, stacklevel=2)
    if aem is not None:
        if out.attention is None:
            raise ValueError(f"aem_lambda > 0 needs a model with attention; {type(module).__name__} "
                             "returns attention=None")
        index = out.batch if out.batch is not None else batch.batch
        terms["aem"] = aem(out.attention, index, dim_size=out.bag_logits.size(0))
    return terms


def train_step(model: torch.nn.Module, batch, optimizer: torch.optim.Optimizer, *, epoch: int = 0,
               aem=None, pos_weight: Optional[Tensor] = None, class_weight: Optional[Tensor] = None,
               grad_clip: Optional[float] = None) -> StepResult:
    """One optimisation step on ``batch``: forward, :func:`loss_terms`, backward, optional
    gradient clipping, ``optimizer.step()``.

    Args:
        model: a :class:`~graphmil.models.MILModel` (or a DDP wrapper of one) in train mode.
        batch: a PyG ``Batch`` (or one ``Data``) already on the model's device.
        optimizer: any ``torch.optim`` optimiser over the model's parameters.
        epoch (int): passed to ``model.losses`` (warm-ups of CASii's instance losses) (default ``0``).
        aem: an :class:`~graphmil.losses.AEMLoss` or ``None`` (default).
        pos_weight, class_weight: task-loss weights (see :func:`class_weights`).
        grad_clip (float, optional): max gradient norm (default ``None``).

    Returns:
        :class:`StepResult`.

    Raises:
        FloatingPointError: a non-finite loss, with every term named (nothing is stepped).
    """
    out = model(batch)
    terms = loss_terms(model, out, batch, epoch, aem, pos_weight, class_weight)
    loss = sum(terms.values())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss at epoch {epoch}: "
                                 f"{ {k: float(v) for k, v in terms.items()} }")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(getattr(model, "module", model).parameters(), grad_clip)
    optimizer.step()
    num_bags = int(batch.num_graphs) if hasattr(batch, "num_graphs") else 1
    return StepResult(float(loss.detach()), {k: float(v.detach()) for k, v in terms.items()}, num_bags)


def lr_factor(epoch: int, config: TrainConfig) -> float:
    r"""Learning-rate multiplier of ``epoch`` (0-based), stepped per epoch: the closed form of the
    schedule :func:`build_scheduler` builds from ``torch.optim.lr_scheduler``.

    .. math::
        f(e) = \begin{cases}
          s + (1 - s)\,\frac{e}{W} & e < W \quad(\text{linear warm-up from } s)\\
          m + (1 - m)\,\tfrac12\big(1 + \cos(\pi\,\tfrac{e - W}{E - W})\big) & \text{cosine}\\
          1 & \text{constant / none}\end{cases}

    with ``W = warmup_epochs``, ``s = warmup_start_factor``, ``m = min_lr_factor``, ``E = epochs``.
    """
    W, s = config.warmup_epochs, config.warmup_start_factor
    if epoch < W:
        return s + (1.0 - s) * epoch / W
    if config.scheduler.lower() == "cosine":
        span = max(1, config.epochs - W)
        m = config.min_lr_factor
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * (epoch - W) / span))
    return 1.0


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` or ``AdamW`` over the trainable parameters, with ``config.lr`` and
    ``config.weight_decay``."""
    params = [p for p in getattr(model, "module", model).parameters() if p.requires_grad]
    cls = torch.optim.Adam if config.optimizer.lower() == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """The per-epoch schedule of :func:`lr_factor` from ``torch.optim.lr_scheduler``:
    ``LinearLR`` warm-up (``warmup_epochs`` from ``warmup_start_factor``) followed by
    ``CosineAnnealingLR`` to ``min_lr_factor · lr`` (``scheduler="cosine"``) or ``ConstantLR``
    with factor 1 (``"constant"`` / ``"none"``), chained by ``SequentialLR``."""
    from torch.optim import lr_scheduler as S

    W = int(config.warmup_epochs)
    if config.scheduler.lower() == "cosine":
        main = S.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs - W),
                                   eta_min=config.min_lr_factor * config.lr)
    else:
        main = S.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if W == 0:
        return main
    warm = S.LinearLR(optimizer, start_factor=config.warmup_start_factor, end_factor=1.0, total_iters=W)
    return S.SequentialLR(optimizer, [warm, main], milestones=[W])


def class_weights(labels: np.ndarray, num_classes: int, spec) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(pos_weight, class_weight)`` of the task loss from ``TrainConfig.class_weights``:
    ``None``, ``"balanced"`` (``w_c = B / (C · n_c)`` on the training labels) or ``C`` weights;
    binary one-logit models get ``pos_weight = w_1 / w_0``.

    Raises:
        ValueError: a class absent from the training split with ``"balanced"``, or a list of the
            wrong length / non-positive weights.
    """
    if spec is None:
        return None, None
    C = max(2, num_classes)
    if spec == "balanced":
        counts = np.bincount(labels, minlength=C).astype(np.float64)
        if (counts == 0).any():
            raise ValueError(f"class_weights='balanced': the training split has no bag of class(es) "
                             f"{np.flatnonzero(counts == 0).tolist()}")
        w = counts.sum() / (C * counts)
    else:
        w = np.asarray(spec, dtype=np.float64)
        if w.shape != (C,) or (w <= 0).any():
            raise ValueError(f"class_weights: expected {C} positive weights, got {list(spec)}")
    if num_classes == 1:
        return torch.tensor([w[1] / w[0]], dtype=torch.float32), None
    return None, torch.tensor(w, dtype=torch.float32)
