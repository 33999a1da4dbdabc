r"""Seeded, stratified (and optionally patient-grouped) cross-validation splits over bags.

A split is a :class:`Split` of three sorted index lists (``train``, ``val``, ``test``) into a
dataset of bags; index a PyG dataset with them directly (``dataset[split.train]``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, List, Optional

import numpy as np

__all__ = ["Split", "stratified_kfold", "splits_from_masks", "holdout_split"]


@dataclass(frozen=True)
class Split:
    """One cross-validation fold: disjoint sorted index lists into a dataset of bags.

    Args:
        train: indices of the training bags.
        val: indices of the validation bags (empty when no inner split was asked for).
        test: indices of the test bags.
        fold: fold number ``0..k-1``.
        repeat: repetition number ``0..repeats-1``.
    """

    train: List[int]
    val: List[int]
    test: List[int]
    fold: int = 0
    repeat: int = 0

    def __repr__(self) -> str:
        return (
            f"Split(repeat={self.repeat}, fold={self.fold}, train={len(self.train)}, "
            f"val={len(self.val)}, test={len(self.test)})"
        )


def _as_labels(labels: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(
            f"stratified_kfold: 'labels' must be 1-D (one label per bag), got shape {arr.shape}"
        )
    if arr.size == 0:
        raise ValueError("stratified_kfold: 'labels' is empty")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError("stratified_kfold: 'labels' has NaN or Inf values")
    # Encode any label type (ints, strings, floats) as 0..C-1.
    _, codes = np.unique(arr, return_inverse=True)
    return codes.reshape(-1)


def _sorted(idx: np.ndarray) -> List[int]:
    return sorted(int(i) for i in idx)


def _inner_val(
    train: np.ndarray,
    y: np.ndarray,
    groups: Optional[np.ndarray],
    val_fraction: float,
    seed: int,
    where: str,
):
    """Split ``train`` into (train, val), stratified on ``y`` and keeping ``groups`` together."""
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    y_tr = y[train]
    if groups is None:
        counts = np.bincount(y_tr)
        counts = counts[counts > 0]
        n_val = int(np.ceil(val_fraction * len(train)))
        if counts.min() < 2 or n_val < len(counts) or len(train) - n_val < len(counts):
            raise ValueError(
                f"stratified_kfold: 'val_fraction'={val_fraction} cannot give a stratified validation "
                f"split of {where} ({len(train)} training bags, smallest class has {counts.min()}); "
                f"use fewer folds, a different val_fraction, or val_fraction=0"
            )
        tr, va = train_test_split(
            train, test_size=n_val, stratify=y_tr, random_state=seed, shuffle=True
        )
        return tr, va
    # Grouped: StratifiedGroupKFold with round(1 / val_fraction) folds, first fold = validation.
    n_inner = max(2, int(round(1.0 / val_fraction)))
    g_tr = groups[train]
    n_groups = len(np.unique(g_tr))
    if n_groups < n_inner:
        raise ValueError(
            f"stratified_kfold: 'val_fraction'={val_fraction} needs at least {n_inner} patient groups "
            f"in the training part of {where}, found {n_groups}"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class.*", category=UserWarning)
        inner = StratifiedGroupKFold(n_splits=n_inner, shuffle=True, random_state=seed)
        tr_pos, va_pos = next(iter(inner.split(np.zeros(len(train)), y_tr, g_tr)))
    return train[tr_pos], train[va_pos]


def stratified_kfold(
    labels: Any,
    k: int = 5,
    seed: int = 0,
    groups: Optional[Any] = None,
    val_fraction: float = 0.0,
    repeats: int = 1,
) -> List[Split]:
    r"""Seeded stratified k-fold over bags, with optional patient grouping and inner validation split.

    Each bag is in the test part of exactly one fold per repetition. With ``groups`` (e.g. the
    ``case_id`` of each slide), all bags of a group fall in the same part (train, val or test) of
    every fold. Class proportions in each test fold follow the whole set's:

    .. math::
        \bigl|\,|\{i \in \text{test}_f : y_i = c\}| - n_c / k\,\bigr| \le 1
        \qquad \text{(no groups)}

    and approximately so with groups (``sklearn``'s ``StratifiedGroupKFold`` heuristic).
    An inner validation part of about ``val_fraction`` of the training bags is then drawn from
    each fold's training part, stratified (``train_test_split``) or grouped
    (``StratifiedGroupKFold`` with :math:`\mathrm{round}(1/\text{val\_fraction})` folds, first
    fold kept). Repetition :math:`r` uses seed ``seed + r``.

    Args:
        labels: bag labels ``[num_bags]`` (ints, strings, a tensor; ``[num_bags, 1]`` accepted).
        k (int, optional): number of folds. (default: ``5``)
        seed (int, optional): random seed; the same seed gives the same splits. (default: ``0``)
        groups (optional): one group id per bag (patient / case id); bags of a group never span
            train and test. (default: ``None``)
        val_fraction (float, optional): fraction of each fold's training bags moved to ``val``,
            ``0 <= val_fraction < 1``. (default: ``0.0``)
        repeats (int, optional): number of repetitions with seeds ``seed, seed+1, ...``.
            (default: ``1``)

    Returns:
        ``repeats * k`` :class:`Split` objects, ordered by repetition then fold.

    Raises:
        ValueError: for ``k < 2``, ``k`` larger than the smallest class (or than the number of
            groups), mismatched ``groups`` length, ``val_fraction`` outside ``[0, 1)``,
            ``repeats < 1``, a single class, or a validation split that cannot be stratified.

    Shapes:
        - **input:** labels :math:`(B,)`, groups :math:`(B,)`
        - **output:** lists of indices in ``0..B-1``

    Example:
        >>> folds = stratified_kfold([0, 1] * 10, k=5, seed=0, val_fraction=0.25)
        >>> len(folds), len(folds[0].test), len(folds[0].val)
        (5, 4, 4)
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = _as_labels(labels)
    n = len(y)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 2:
        raise ValueError(f"stratified_kfold: 'k' must be an integer >= 2, got {k!r}")
    if not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise ValueError(f"stratified_kfold: 'repeats' must be an integer >= 1, got {repeats!r}")
    if not (0.0 <= float(val_fraction) < 1.0):
        raise ValueError(f"stratified_kfold: 'val_fraction' must be in [0, 1), got {val_fraction!r}")
    counts = np.bincount(y)
    if len(counts) < 2:
        raise ValueError("stratified_kfold: 'labels' hold a single class; stratification needs at least two")
    if k > counts.min():
        raise ValueError(
            f"stratified_kfold: 'k'={k} is larger than the smallest class ({counts.min()} bags); "
            f"use k <= {counts.min()}"
        )
    g = None
    if groups is not None:
        g_raw = np.asarray(groups.cpu().numpy() if hasattr(groups, "cpu") else groups).reshape(-1)
        if len(g_raw) != n:
            raise ValueError(
                f"stratified_kfold: 'groups' has {len(g_raw)} entries but 'labels' has {n}"
            )
        _, g = np.unique(g_raw, return_inverse=True)
        g = g.reshape(-1)
        n_groups = int(g.max()) + 1
        if k > n_groups:
            raise ValueError(
                f"stratified_kfold: 'k'={k} is larger than the number of groups ({n_groups})"
            )
        for c in range(len(counts)):
            gc = len(np.unique(g[y == c]))
            if gc < k:
                warnings.warn(
                    f"stratified_kfold: class {c} spans only {gc} groups (< k={k}); some test folds "
                    f"will have no bag of that class",
                    stacklevel=2,
                )

    out: List[Split] = []
    idx = np.arange(n)
    for r in range(int(repeats)):
        s = int(seed) + r
        if g is None:
            splitter = StratifiedKFold(n_splits=int(k), shuffle=True, random_state=s)
            folds = splitter.split(np.zeros(n), y)
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*least populated class.*", category=UserWarning)
                splitter = StratifiedGroupKFold(n_splits=int(k), shuffle=True, random_state=s)
                folds = list(splitter.split(np.zeros(n), y, g))
        for f, (tr, te) in enumerate(folds):
            va = np.empty(0, dtype=np.int64)
            if val_fraction > 0:
                tr, va = _inner_val(idx[tr], y, g, float(val_fraction), s * 1000 + f,
                                    f"fold {f} of repeat {r}")
            out.append(Split(_sorted(tr), _sorted(va), _sorted(te), fold=f, repeat=r))
    return out


def splits_from_masks(train_masks: Any) -> List[Split]:
    r"""Turn a fixed boolean protocol (``train = mask``, ``test = ~mask``) into :class:`Split` s.

    This reads published CV protocols such as ``folds_train_mask`` of the MUSK1 file
    (``[5, 10, num_bags]``: 5 repetitions of 10-fold CV).

    Args:
        train_masks: boolean array ``[R, K, B]`` or ``[K, B]`` (``True`` = training bag).

    Returns:
        ``R * K`` splits (repetition-major), with empty ``val``.

    Shapes:
        - **input:** :math:`(R, K, B)` or :math:`(K, B)`
        - **output:** index lists in ``0..B-1``
    """
    m = np.asarray(train_masks.cpu().numpy() if hasattr(train_masks, "cpu") else train_masks)
    if m.dtype != bool:
        raise ValueError(f"splits_from_masks: 'train_masks' must be boolean, got dtype {m.dtype}")
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"splits_from_masks: 'train_masks' must be [R, K, B] or [K, B], got shape {m.shape}")
    out = []
    for r in range(m.shape[0]):
        for f in range(m.shape[1]):
            out.append(Split(
                _sorted(np.flatnonzero(m[r, f])), [], _sorted(np.flatnonzero(~m[r, f])), fold=f, repeat=r
            ))
    return out


def holdout_split(labels: Any, fraction: float, seed: int = 0, groups: Optional[Any] = None):
    r"""One seeded split of bags into ``(rest, held_out)``, stratified by label and keeping every
    group (patient) on one side.

    Without groups: ``sklearn``'s ``train_test_split`` with ``test_size = ⌈fraction · B⌉``,
    stratified when every class has at least two bags (else unstratified). With groups:
    ``StratifiedGroupKFold`` with :math:`\max(2, \mathrm{round}(1/\text{fraction}))` folds, the
    first fold held out, so about ``fraction`` of the bags and no group on both sides.

    Args:
        labels: bag labels ``[B]``.
        fraction (float): share held out, ``0 < fraction < 1``.
        seed (int): seed (default ``0``).
        groups (optional): one group (case) id per bag (default ``None``: each bag its own group).

    Returns:
        ``(rest, held_out)``: sorted index lists, both non-empty.

    Raises:
        ValueError: ``fraction`` outside ``(0, 1)``, fewer than two bags, or fewer groups than
            the grouped split needs.
    """
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    y = _as_labels(labels)
    n = len(y)
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"holdout_split: 'fraction' must be in (0, 1), got {fraction!r}")
    if n < 2:
        raise ValueError(f"holdout_split: needs at least 2 bags, got {n}")
    idx = np.arange(n)
    if groups is None or len(np.unique(np.asarray(groups))) == n:
        n_held = min(n - 1, max(1, int(np.ceil(float(fraction) * n))))
        counts = np.bincount(y)
        counts = counts[counts > 0]
        strat = y if counts.min() >= 2 and n_held >= len(counts) and n - n_held >= len(counts) else None
        a, b = train_test_split(idx, test_size=n_held, stratify=strat, random_state=seed, shuffle=True)
        return _sorted(a), _sorted(b)
    g_raw = np.asarray(groups.cpu().numpy() if hasattr(groups, "cpu") else groups).reshape(-1)
    if len(g_raw) != n:
        raise ValueError(f"holdout_split: 'groups' has {len(g_raw)} entries but 'labels' has {n}")
    _, g = np.unique(g_raw, return_inverse=True)
    n_splits = max(2, int(round(1.0 / float(fraction))))
    n_groups = int(g.max()) + 1
    if n_groups < 2:
        raise ValueError("holdout_split: all bags belong to one group (patient); nothing can be held out")
    n_splits = min(n_splits, n_groups)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class.*", category=UserWarning)
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        rest, held = next(iter(splitter.split(np.zeros(n), y, g)))
    return _sorted(rest), _sorted(held)
