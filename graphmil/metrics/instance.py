"""Instance-level localisation metrics: pooled AUROC, the Sm paper's protocol, per-bag AUROC,
attention entropy summaries."""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import numpy as np

from graphmil.metrics.bag import UndefinedMetricWarning, to_numpy

__all__ = [
    "instance_auroc",
    "sm_instance_auroc",
    "best_threshold",
    "per_bag_instance_auroc",
    "attention_entropy_summary",
    "instance_metrics",
]


def _labelled(scores, y_inst, index=None):
    s = to_numpy(scores).astype(np.float64).reshape(-1)
    y = to_numpy(y_inst).astype(np.int64).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"instance metrics: {s.size} scores but {y.size} labels ('y_inst')")
    keep = y >= 0
    if index is None:
        return s[keep], y[keep], None
    idx = to_numpy(index).astype(np.int64).reshape(-1)
    if idx.shape != s.shape:
        raise ValueError(f"instance metrics: 'index' has {idx.size} entries for {s.size} scores")
    return s[keep], y[keep], idx[keep]


def _auc(s: np.ndarray, y: np.ndarray, name: str) -> float:
    from sklearn.metrics import roc_auc_score

    y = (y > 0).astype(np.int64)
    if y.size == 0 or y.min() == y.max():
        warnings.warn(f"{name} is undefined: the labelled instances hold one class only "
                      f"({y.size} labelled); reporting NaN", UndefinedMetricWarning, stacklevel=3)
        return float("nan")
    return float(roc_auc_score(y, s))


def instance_auroc(scores, y_inst) -> float:
    r"""AUROC of instance scores against instance labels, pooled over all instances of all bags.

    .. math::
        \mathrm{AUROC} = P\big(s_{i^+} > s_{i^-}\big) + \tfrac12 P\big(s_{i^+} = s_{i^-}\big)

    over labelled instances (``y_inst >= 0``; ``-1`` = unknown is ignored, labels ``> 0`` are
    positive).

    Args:
        scores: ``[N]`` instance scores (higher = more positive).
        y_inst: ``[N]`` instance labels.

    Returns:
        float, ``NaN`` (with a warning) when the labelled instances hold one class only.
    """
    s, y, _ = _labelled(scores, y_inst)
    return _auc(s, y, "instance AUROC")


def sm_instance_auroc(scores, y_inst, index, bag_pred) -> float:
    r"""Instance AUROC with the Sm paper's protocol (Castro-Macías et al., 2024).

    Instances of bags predicted negative get the minimum score of the test set, then one AUROC is
    computed over all pooled labelled instances:

    .. math::
        \tilde s_i = \begin{cases} s_i & \hat Y_{b(i)} = 1 \\ \min_j s_j & \hat Y_{b(i)} = 0\end{cases}

    Args:
        scores: ``[N]`` instance scores.
        y_inst: ``[N]`` instance labels (``-1`` ignored).
        index: ``[N]`` bag of each instance (``0..B-1``).
        bag_pred: ``[B]`` hard bag predictions (0/1).
    """
    s = to_numpy(scores).astype(np.float64).reshape(-1)
    idx = to_numpy(index).astype(np.int64).reshape(-1)
    pred = to_numpy(bag_pred).astype(np.int64).reshape(-1)
    if idx.size and idx.max() >= pred.size:
        raise ValueError(f"sm_instance_auroc: 'index' refers to bag {idx.max()} but 'bag_pred' has {pred.size}")
    s = np.where(pred[idx] > 0, s, s.min() if s.size else 0.0)
    s, y, _ = _labelled(s, y_inst)
    return _auc(s, y, "instance AUROC (Sm protocol)")


def best_threshold(scores, y_inst) -> Tuple[float, float]:
    r"""Threshold maximising :math:`\mathrm{TPR}\cdot(1-\mathrm{FPR})` on labelled instances (the Sm
    paper chooses it on validation instances and reports instance F1 at it).

    Returns:
        ``(threshold, TPR·(1−FPR) at it)``; ``(NaN, NaN)`` with a warning for one class only.
    """
    from sklearn.metrics import roc_curve

    s, y, _ = _labelled(scores, y_inst)
    y = (y > 0).astype(np.int64)
    if y.size == 0 or y.min() == y.max():
        warnings.warn("best_threshold is undefined: one class only; reporting NaN", UndefinedMetricWarning,
                      stacklevel=2)
        return float("nan"), float("nan")
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    j = tpr * (1 - fpr)
    k = int(np.argmax(j))
    t = float(thr[k]) if np.isfinite(thr[k]) else float(s.max())
    return t, float(j[k])


def per_bag_instance_auroc(scores, y_inst, index) -> float:
    """Mean over bags of the within-bag instance AUROC, over the bags whose labelled instances
    hold both classes (the others are skipped); ``NaN`` with a warning if there is none."""
    from sklearn.metrics import roc_auc_score

    s, y, idx = _labelled(scores, y_inst, index)
    y = (y > 0).astype(np.int64)
    aucs = []
    for b in np.unique(idx):  # metric code, not a forward path
        m = idx == b
        if y[m].min() != y[m].max():
            aucs.append(roc_auc_score(y[m], s[m]))
    if not aucs:
        warnings.warn("per-bag instance AUROC is undefined: no bag has both instance classes; "
                      "reporting NaN", UndefinedMetricWarning, stacklevel=2)
        return float("nan")
    return float(np.mean(aucs))


def attention_entropy_summary(attention, index, num_bags: Optional[int] = None) -> Dict[str, float]:
    r"""Summary of the per-bag attention entropy (AEM, Zhang et al. 2024).

    .. math::
        H_b = -\sum_{i\in b} a_i \log a_i, \qquad \bar H_b = H_b / \log N_b \;\; (N_b > 1)

    With ``H`` heads (``attention [N, H]``) each head's entropy is averaged.

    Returns:
        ``{"entropy_mean", "entropy_std", "entropy_norm_mean"}`` over bags.
    """
    a = to_numpy(attention).astype(np.float64)
    if a.ndim == 1:
        a = a[:, None]
    idx = to_numpy(index).astype(np.int64).reshape(-1)
    if idx.size != a.shape[0]:
        raise ValueError(f"attention_entropy_summary: 'index' has {idx.size} entries for {a.shape[0]} rows")
    B = int(num_bags) if num_bags is not None else (int(idx.max()) + 1 if idx.size else 0)
    plogp = np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0)
    ent = np.zeros((B, a.shape[1]))
    np.add.at(ent, idx, -plogp)
    ent = ent.mean(axis=1)
    n = np.bincount(idx, minlength=B).astype(np.float64)
    norm = np.where(n > 1, ent / np.log(np.maximum(n, 2)), 0.0)
    return {"entropy_mean": float(ent.mean()) if B else float("nan"),
            "entropy_std": float(ent.std()) if B else float("nan"),
            "entropy_norm_mean": float(norm.mean()) if B else float("nan")}


def instance_metrics(scores, y_inst, index, bag_pred=None) -> Dict[str, float]:
    """Every instance metric at once: ``instance_auroc``, ``instance_auroc_sm`` (when ``bag_pred``
    is given), ``instance_auroc_per_bag``. Returns an empty dict when no instance is labelled."""
    y = to_numpy(y_inst).reshape(-1)
    if y.size == 0 or (y < 0).all():
        return {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UndefinedMetricWarning)
        out = {"instance_auroc": instance_auroc(scores, y_inst)}
        if bag_pred is not None:
            out["instance_auroc_sm"] = sm_instance_auroc(scores, y_inst, index, bag_pred)
        out["instance_auroc_per_bag"] = per_bag_instance_auroc(scores, y_inst, index)
    return out
