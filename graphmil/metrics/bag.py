"""Bag-level classification metrics (AUROC, accuracy, F1, precision, recall) via scikit-learn."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

__all__ = ["bag_probabilities", "bag_predictions", "bag_metrics", "to_numpy", "UndefinedMetricWarning",
           "ignore_undefined_metrics", "bootstrap_ci", "classification_summary"]


class UndefinedMetricWarning(RuntimeWarning):
    """A metric is undefined on these labels (one class only) and reported as ``NaN``.

    Filter it alone (``warnings.filterwarnings("ignore", category=UndefinedMetricWarning)`` or
    :func:`ignore_undefined_metrics`), never every ``RuntimeWarning``."""


@contextlib.contextmanager
def ignore_undefined_metrics():
    """A context in which :class:`UndefinedMetricWarning` is silent (and nothing else is)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UndefinedMetricWarning)
        yield


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
    warnings.warn(f"{name} is undefined: {why}; reporting NaN", UndefinedMetricWarning, stacklevel=3)
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
        class only) is ``NaN`` with an :class:`UndefinedMetricWarning`.
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


def bootstrap_ci(metric: Callable[[np.ndarray], Any], num_items: int, groups: Optional[Sequence] = None,
                 num_samples: int = 1000, level: float = 0.95, seed: int = 0) -> Dict[str, Any]:
    r"""Percentile bootstrap confidence intervals of metrics, resampling *groups* (patients).

    Each of ``num_samples`` replicates draws the groups with replacement (a patient drawn twice
    brings all its slides twice) and evaluates ``metric(idx)`` on the item indices drawn;
    replicates where a metric is undefined (``NaN``: one class only) are dropped for it. The
    interval is the :math:`\alpha/2` and :math:`1-\alpha/2` quantiles of the replicates,
    :math:`\alpha = 1 - \text{level}`:

    .. math::
        \mathrm{CI} = \big[\,q_{\alpha/2}(m^*_1..m^*_R),\; q_{1-\alpha/2}(m^*_1..m^*_R)\,\big]

    Args:
        metric: ``idx [k] -> float`` or ``-> {name: float}``, evaluated on resampled item indices.
        num_items (int): number of items (bags) ``B``.
        groups (optional): one group id per item (default ``None``: each item its own group).
        num_samples (int): replicates ``R`` (default ``1000``).
        level (float): confidence level (default ``0.95``).
        seed (int): seed of the resampling (default ``0``).

    Returns:
        ``{"value", "low", "high", "num_samples"}`` (``value`` = the metric on all items; ``low`` /
        ``high`` NaN when no replicate was defined), or ``{name: {...}}`` for a dict metric.
    """
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: 'level' must be in (0, 1), got {level}")
    if num_samples < 1:
        raise ValueError(f"bootstrap_ci: 'num_samples' must be >= 1, got {num_samples}")
    g = np.arange(num_items) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    if g.shape[0] != num_items:
        raise ValueError(f"bootstrap_ci: 'groups' has {g.shape[0]} entries for {num_items} items")
    members = np.split(np.argsort(g, kind="stable"), np.cumsum(np.bincount(g))[:-1])
    rng = np.random.default_rng(seed)
    with ignore_undefined_metrics():
        value = metric(np.arange(num_items))
        single = not isinstance(value, dict)
        value = {"m": value} if single else dict(value)
        reps: Dict[str, list] = {k: [] for k in value}
        for _ in range(int(num_samples)):
            pick = rng.integers(0, len(members), len(members))
            v = metric(np.concatenate([members[k] for k in pick]))
            for k, x in ({"m": v} if single else v).items():
                if k in reps and np.isfinite(x):
                    reps[k].append(float(x))
    a = (1.0 - level) / 2.0
    out: Dict[str, Any] = {}
    for k, v in value.items():
        r = np.asarray(reps[k])
        lo, hi = (np.quantile(r, [a, 1.0 - a]) if r.size else (float("nan"), float("nan")))
        out[k] = {"value": float(v), "low": float(lo), "high": float(hi), "num_samples": int(r.size)}
    return out["m"] if single else out


def _auroc_binary(y: np.ndarray, s: np.ndarray) -> float:
    """Mann–Whitney AUROC with mid-ranks for ties (``NaN`` for one class)."""
    from scipy.stats import rankdata

    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def classification_summary(y, probs, pred=None, threshold: float = 0.5) -> Dict[str, float]:
    r"""Bag metrics without scikit-learn's per-call overhead, for bootstrap replicates:
    ``auroc`` (binary: Mann–Whitney with mid-ranks; multiclass: macro one-vs-rest), ``accuracy``,
    ``balanced_accuracy`` (mean per-class recall), and ``f1``, ``precision``, ``recall``
    (positive class for binary tasks, macro over classes otherwise, ``0`` where undefined as in
    :func:`bag_metrics` with ``zero_division=0``).

    .. math::
        \mathrm{AUROC} = rac{\sum_{i: y_i = 1} r_i - n_1(n_1 + 1)/2}{n_1 n_0}, \qquad
        \mathrm{BA} = rac1C \sum_c rac{|\{i : \hat y_i = y_i = c\}|}{|\{i : y_i = c\}|}

    Args:
        y: labels ``[B]``.
        probs: positive-class probabilities ``[B]`` (binary) or ``[B, C]``.
        pred: hard predictions ``[B]`` (default: ``probs >= threshold`` / argmax).
        threshold (float): binary decision threshold (default ``0.5``).

    Returns:
        The six metrics; an undefined one (a single class) is ``NaN``.
    """
    y = np.asarray(y).astype(np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    multiclass = p.ndim == 2
    if pred is None:
        pred = p.argmax(axis=1) if multiclass else (p >= threshold).astype(np.int64)
    pred = np.asarray(pred).astype(np.int64).reshape(-1)
    C = p.shape[1] if multiclass else 2
    present = np.unique(y)
    out: Dict[str, float] = {}
    if len(present) < 2 or (multiclass and len(present) < C):
        out["auroc"] = float("nan")
    elif multiclass:
        out["auroc"] = float(np.mean([_auroc_binary((y == c).astype(np.int64), p[:, c]) for c in range(C)]))
    else:
        out["auroc"] = _auroc_binary(y, p)
    out["accuracy"] = float((pred == y).mean()) if y.size else float("nan")
    cm = np.zeros((C, C), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1).astype(np.float64), cm.sum(axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rec = np.where(support > 0, tp / support, 0.0)
        prec = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
    out["balanced_accuracy"] = float(rec[support > 0].mean()) if len(present) > 1 else float("nan")
    if multiclass:
        out["f1"], out["precision"], out["recall"] = float(f1.mean()), float(prec.mean()), float(rec.mean())
    else:
        out["f1"], out["precision"], out["recall"] = float(f1[1]), float(prec[1]), float(rec[1])
    return out
