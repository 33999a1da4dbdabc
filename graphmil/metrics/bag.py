"""Bag-level classification metrics (AUROC, accuracy, F1, precision, recall) via scikit-learn."""

from __future__ import annotations

import warnings
from typing import Dict, Optional

import numpy as np

__all__ = ["bag_probabilities", "bag_predictions", "bag_metrics", "to_numpy"]


def to_numpy(a) -> np.ndarray:
    """Tensor / list / array → ``np.ndarray`` (detached, on CPU)."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().float().numpy() if a.is_floating_point() else a.detach().cpu().numpy()
    return np.asarray(a)


def bag_probabilities(logits) -> np.ndarray:
    r"""Class probabilities from bag logits.

    .. math::
        p_b = \sigma(\ell_b) \;\; (C = 1), \qquad
        p_b = \operatorname{softmax}(\ell_b)_1 \;\; (C = 2), \qquad
        p_{b} = \operatorname{softmax}(\ell_b) \;\; (C > 2).

    Args:
        logits: ``[B, C]`` (or ``[B]`` read as ``C = 1``).

    Returns:
        ``[B]`` positive-class probabilities for ``C <= 2``, ``[B, C]`` for ``C > 2``.
    """
    z = to_numpy(logits).astype(np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2:
        raise ValueError(f"bag_probabilities: 'logits' must be [B, C], got shape {z.shape}")
    if z.shape[1] == 1:
        return 1.0 / (1.0 + np.exp(-z[:, 0]))
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    return p[:, 1] if z.shape[1] == 2 else p


def bag_predictions(probs, threshold: float = 0.5) -> np.ndarray:
    """Hard labels: ``p >= threshold`` for binary ``[B]`` probabilities, argmax for ``[B, C]``."""
    p = to_numpy(probs)
    if p.ndim == 1:
        return (p >= threshold).astype(np.int64)
    return p.argmax(axis=1).astype(np.int64)


def _nan(name: str, why: str) -> float:
    warnings.warn(f"{name} is undefined: {why}; reporting NaN", RuntimeWarning, stacklevel=3)
    return float("nan")


def bag_metrics(logits, y, threshold: float = 0.5, average: Optional[str] = None,
                probs=None) -> Dict[str, float]:
    r"""AUROC, accuracy, F1, precision and recall of bag predictions (scikit-learn).

    Binary tasks (``C = 1`` logits through a sigmoid, ``C = 2`` through ``softmax[:, 1]``) use the
    positive class at ``threshold``; multiclass tasks (``C > 2``) use argmax predictions, macro
    one-vs-rest AUROC and macro F1/precision/recall.

    .. math::
        \mathrm{acc} = \tfrac{1}{B}\sum_b [\hat y_b = y_b], \quad
        F_1 = \tfrac{2PR}{P + R}, \quad \mathrm{AUROC} = P(p_{b^+} > p_{b^-}).

    Args:
        logits: bag logits ``[B, C]`` (ignored when ``probs`` is given).
        y: bag labels ``[B]`` (0/1 or class index).
        threshold (float): decision threshold on the positive probability (default ``0.5``).
        average (str, optional): ``"binary"`` (default for binary tasks) or ``"macro"`` (default
            for multiclass; the AEM paper reports macro F1 for binary tasks too).
        probs: precomputed probabilities (``[B]`` or ``[B, C]``) instead of logits.

    Returns:
        ``{"auroc", "accuracy", "f1", "precision", "recall"}``; a metric that is undefined (one
        class only) is ``NaN`` with a :class:`RuntimeWarning`.
    """
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    p = bag_probabilities(logits) if probs is None else to_numpy(probs).astype(np.float64)
    y = to_numpy(y).reshape(-1).astype(np.int64)
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"bag_metrics: {p.shape[0]} predictions but {y.shape[0]} labels ('y')")
    multiclass = p.ndim == 2
    if average is None:
        average = "macro" if multiclass else "binary"
    if average not in ("binary", "macro"):
        raise ValueError(f"bag_metrics: 'average' must be 'binary' or 'macro', got {average!r}")
    if multiclass and average == "binary":
        raise ValueError("bag_metrics: average='binary' needs a binary task (C <= 2)")
    pred = bag_predictions(p, threshold)
    out: Dict[str, float] = {}
    present = np.unique(y)
    if len(present) < 2:
        out["auroc"] = _nan("bag AUROC", f"only class {present.tolist()} in the labels")
    elif multiclass:
        if len(present) < p.shape[1]:
            out["auroc"] = _nan("macro one-vs-rest AUROC", f"classes {sorted(set(range(p.shape[1])) - set(present.tolist()))} absent")
        else:
            out["auroc"] = float(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    else:
        out["auroc"] = float(roc_auc_score(y, p))
    out["accuracy"] = float(accuracy_score(y, pred))
    kw = dict(average=average, zero_division=0)
    if average == "binary":
        kw["pos_label"] = 1
    elif multiclass:
        kw["labels"] = list(range(p.shape[1]))
    else:
        kw["labels"] = [0, 1]
    out["f1"] = float(f1_score(y, pred, **kw))
    out["precision"] = float(precision_score(y, pred, **kw))
    out["recall"] = float(recall_score(y, pred, **kw))
    return out
