"""CASii's negative key bank: representative normal instances chosen by CUR leverage scores.

Su, Rezapour, Sajjad, Niu, Gurcan & Niazi, *Cross-attention-based saliency inference for
predicting cancer metastasis on whole slide images* (CASii / CASiMIL, 2024). The key bank
``K ∈ R^{τ×D}`` is built once, from the **negative (normal) bags of the training split only**, and
stays fixed (a buffer of :class:`graphmil.nn.aggr.CASiiAggregation`, saved in the state dict).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "leverage_scores",
    "select_negative_keys",
    "KeySelection",
    "is_negative_bag",
    "negative_bags_from_split",
]

# Leverage scores closer than this are a tie (broken by original order): the scores of a full-rank
# bag with n <= D are all exactly 1/k in exact arithmetic but differ by ~1e-15 in floating point.
_TIE_DECIMALS = 9
# Rows per block when accumulating the D x D Gram matrix / projecting onto the singular vectors.
_CHUNK = 8192


def _rank_tolerance(smax: float, n: int, d: int, dtype: torch.dtype, rtol: Optional[float]) -> float:
    # numpy's rule with the input's epsilon; half/bfloat16/integer features use float32's (they are
    # up-cast before any arithmetic, and max(n, D) * eps(float16) would exceed 1 for large bags).
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    factor = max(n, d) * eps if rtol is None else rtol
    return smax * factor


def leverage_scores(
    x: Tensor,
    rtol: Optional[float] = None,
    method: str = "auto",
) -> Tuple[Tensor, int]:
    r"""Normalised CUR leverage scores of the instances of one bag, and the bag's numeric rank.

    With the bag's features as columns, :math:`A = X^\top \in \mathbb{R}^{D\times n}`,
    :math:`A = U \Sigma V^\top` and :math:`k = \operatorname{rank}(A)`:

    .. math::
        s_j = \frac{1}{k} \sum_{h=1}^{k} V_{jh}^2 , \qquad j = 1, \dots, n ,

    i.e. the statistical leverage of instance :math:`j` on the top-:math:`k` right singular
    subspace (the instance-space singular vectors; :math:`\sum_j s_j = 1`).

    **Numeric rank** follows ``numpy.linalg.matrix_rank``: :math:`k = \#\{\sigma_h > \sigma_1
    \cdot \max(n, D)\cdot\varepsilon\}` with :math:`\varepsilon` the machine epsilon of the
    *input* dtype (float32 features: ``1.19e-7``; float64: ``2.2e-16``; half precision and integer
    features use float32's), or :math:`\sigma_1 \cdot` ``rtol`` if given.
    Computations run in float64.

    **Method.** ``"svd"``: thin SVD of ``x`` (``torch.linalg.svd(full_matrices=False)``, at most an
    ``n × min(n, D)`` factor). ``"gram"``: eigendecomposition of the ``D × D`` Gram matrix
    :math:`X^\top X = W \Lambda W^\top` accumulated in blocks of rows, then
    :math:`V_{:,h} = X w_h / \sigma_h` — the cheapest in memory and time for ``n > D`` (float64
    Gram resolves singular values down to :math:`\sim 10^{-8}\sigma_1`, far below the float32 rank
    tolerance). ``"auto"`` (default) uses ``"gram"`` when ``n > D`` and the input is not float64,
    else ``"svd"``. An ``n × n`` matrix is never formed when ``n > D``.

    Args:
        x (Tensor): features of one bag ``[n, D]`` (finite, ``n >= 1``).
        rtol (float, optional): relative rank tolerance (default ``None`` = numpy's rule above).
        method (str): ``"auto"``, ``"svd"`` or ``"gram"`` (default ``"auto"``).

    Returns:
        ``(scores [n] float64, rank)``; all-zero bags give rank 0 and zero scores.

    Shapes:
        - **input:** ``x [n, D]``
        - **output:** ``[n]``
    """
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"leverage_scores: 'x' must be a 2-D tensor [n, D], got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if method not in ("auto", "svd", "gram"):
        raise ValueError(f"leverage_scores: 'method' must be 'auto', 'svd' or 'gram', got {method!r}")
    n, d = x.shape
    if n == 0 or d == 0:
        raise ValueError(f"leverage_scores: 'x' is empty (shape {tuple(x.shape)})")
    in_dtype = x.dtype if x.is_floating_point() else torch.float32
    if method == "auto":
        method = "gram" if (n > d and in_dtype != torch.float64) else "svd"

    if method == "svd":
        x64 = x.detach().to(torch.float64)
        u, sv, _ = torch.linalg.svd(x64, full_matrices=False)
        smax = float(sv[0]) if sv.numel() else 0.0
        tol = _rank_tolerance(smax, n, d, in_dtype, rtol)
        k = int((sv > tol).sum()) if smax > 0 else 0
        if k == 0:
            return torch.zeros(n, dtype=torch.float64, device=x.device), 0
        return u[:, :k].pow(2).sum(1) / k, k

    # Gram path: G = X^T X (D x D), float64, accumulated block by block.
    xd = x.detach()
    gram = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for start in range(0, n, _CHUNK):
        blk = xd[start:start + _CHUNK].to(torch.float64)
        gram.addmm_(blk.t(), blk)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    sv = evals.clamp_min(0).sqrt()
    smax = float(sv[0])
    tol = _rank_tolerance(smax, n, d, in_dtype, rtol)
    k = int((sv > tol).sum()) if smax > 0 else 0
    if k == 0:
        return torch.zeros(n, dtype=torch.float64, device=x.device), 0
    proj = evecs[:, :k] / sv[:k]  # [D, k]: V = X W_k Σ_k^{-1}
    scores = torch.empty(n, dtype=torch.float64, device=x.device)
    for start in range(0, n, _CHUNK):
        blk = xd[start:start + _CHUNK].to(torch.float64)
        scores[start:start + _CHUNK] = (blk @ proj).pow(2).sum(1)
    return scores / k, k


@dataclass
class KeySelection:
    """Result of :func:`select_negative_keys` with ``return_info=True``.

    Attributes:
        keys: the key bank ``[τ, D]`` (float32 rows copied from the bags).
        bag_index: position (in the iteration order of ``bags``) of the bag each key came from ``[τ]``.
        instance_index: row of the key within its bag ``[τ]``.
        ranks: numeric rank of every *used* bag, in order.
        skipped: ``(position, slide_id or None, reason)`` of every bag that was not used.
    """

    keys: Tensor
    bag_index: Tensor
    instance_index: Tensor
    ranks: List[int] = field(default_factory=list)
    skipped: List[Tuple[int, Optional[str], str]] = field(default_factory=list)


def _bag_features(item: Any, pos: int) -> Tuple[Optional[Tensor], Optional[str]]:
    slide_id = None
    if isinstance(item, Tensor):
        x = item
    elif isinstance(item, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(item))
    elif hasattr(item, "x"):  # a PyG Data
        if int(getattr(item, "num_graphs", 1) or 1) > 1:
            raise ValueError(f"select_negative_keys: item {pos} of 'bags' is a Batch of {item.num_graphs} "
                             "bags; pass the bags one by one (e.g. the dataset, not a DataLoader)")
        x = item.x
        slide_id = getattr(item, "slide_id", None)
        y = getattr(item, "y", None)
        if y is not None and not is_negative_bag(item):
            raise ValueError(
                f"select_negative_keys: bag {pos}{f' ({slide_id})' if slide_id else ''} in 'bags' has "
                f"label y={y.tolist() if isinstance(y, Tensor) else y}; keys must come from negative "
                "bags only (use negative_bags_from_split)"
            )
    else:
        raise ValueError(
            f"select_negative_keys: bag {pos} in 'bags' is a {type(item).__name__}; expected a tensor "
            "[n, D], a numpy array or a Data with 'x'"
        )
    if x is None or not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(
            f"select_negative_keys: bag {pos}{f' ({slide_id})' if slide_id else ''} in 'bags' must have "
            f"2-D features [n, D], got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
        )
    if not (x.is_floating_point() or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"select_negative_keys: bag {pos} in 'bags' has non-numeric dtype {x.dtype}")
    if isinstance(slide_id, (list, tuple)):
        slide_id = slide_id[0] if len(slide_id) == 1 else str(slide_id)
    return x, (str(slide_id) if slide_id is not None else None)


def select_negative_keys(
    bags: Iterable[Any],
    t: int = 50,
    progress: bool = True,
    rtol: Optional[float] = None,
    method: str = "auto",
    return_info: bool = False,
):
    r"""Build CASii's negative key bank from normal bags by CUR leverage scores (Su et al., 2024).

    For each negative bag :math:`m` (features :math:`A_m = X_m^\top \in \mathbb{R}^{D\times n_m}`),
    with :math:`k_m = \operatorname{rank}(A_m)` and the top-:math:`k_m` right singular vectors
    :math:`V` (see :func:`leverage_scores`):

    .. math::
        s_j = \frac{1}{k_m}\sum_{h \le k_m} V_{jh}^2, \qquad
        S_m = \operatorname{top}_{\min(k_m, t)}(s), \qquad
        K = \big[\, X_1[S_1];\; X_2[S_2];\; \dots \big] \in \mathbb{R}^{\tau\times D}.

    Instances are kept in decreasing score order. Scores whose leverages :math:`k_m s_j \in [0, 1]`
    agree to ``9`` decimals are ties, broken by original order (a stable sort): a full-rank bag with
    ``n_m <= D`` (every score exactly :math:`1/n_m`, up to rounding) keeps its first
    :math:`\min(n_m, t)` instances. Bags are streamed one at a time (only one bag's features and a ``D × D``
    matrix live in memory). Bags with NaN/Inf features, no instances, or rank 0 (all-zero) are
    **skipped with a warning** naming their position (and ``slide_id``), and listed in
    ``KeySelection.skipped``.

    Use **only the negative bags of the training split** (see :func:`negative_bags_from_split`);
    a ``Data`` bag whose label is not negative raises.

    Args:
        bags: iterable of negative bags: tensors / arrays ``[n_m, D]``, PyG ``Data`` (uses ``.x``),
            or a dataset of them. A single tensor is rejected (it would iterate over rows).
        t (int): keys per bag at most (default ``50``).
        progress (bool): show a ``tqdm`` progress bar (default ``True``).
        rtol (float, optional): relative rank tolerance (default numpy's rule, see
            :func:`leverage_scores`).
        method (str): SVD route, ``"auto"``/``"svd"``/``"gram"`` (default ``"auto"``).
        return_info (bool): also return where each key came from and the skipped bags
            (default ``False``).

    Returns:
        ``keys [τ, D]`` (float32), or a :class:`KeySelection` if ``return_info``.

    Raises:
        ValueError: for a bad ``t``, bags of different widths, a positive ``Data`` bag, or when no
            bag is usable.

    Shapes:
        - **input:** bags ``[n_m, D]``
        - **output:** ``[τ, D]``, ``τ = Σ_m min(rank_m, t)``
    """
    if isinstance(bags, (Tensor, np.ndarray)):
        raise ValueError("select_negative_keys: 'bags' must be an iterable of bags (e.g. a list of [n, D] "
                         "tensors), not a single tensor")
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1:
        raise ValueError(f"select_negative_keys: 't' must be an integer >= 1, got {t!r}")
    t = int(t)
    try:
        total = len(bags)  # type: ignore[arg-type]
    except TypeError:
        total = None
    from tqdm.auto import tqdm

    keys: List[Tensor] = []
    bag_idx: List[Tensor] = []
    inst_idx: List[Tensor] = []
    ranks: List[int] = []
    skipped: List[Tuple[int, Optional[str], str]] = []
    width: Optional[int] = None
    bar = tqdm(bags, total=total, disable=not progress, desc="CASii keys", unit="bag")
    for pos, item in enumerate(bar):
        x, slide_id = _bag_features(item, pos)
        name = f"bag {pos}" + (f" ({slide_id})" if slide_id else "")
        if width is None:
            width = x.size(1)
        elif x.size(1) != width:
            raise ValueError(f"select_negative_keys: {name} in 'bags' has {x.size(1)} features, "
                             f"the previous bags {width}")
        reason = None
        if x.size(0) == 0:
            reason = "no instances"
        elif x.is_floating_point() and not torch.isfinite(x).all():
            reason = "NaN/Inf features"
        if reason is None:
            scores, k = leverage_scores(x, rtol=rtol, method=method)
            if k == 0:
                reason = "rank 0 (all-zero features)"
        if reason is not None:
            skipped.append((pos, slide_id, reason))
            warnings.warn(f"select_negative_keys: skipping {name}: {reason}", stacklevel=2)
            continue
        keep = min(k, t)
        order = torch.sort(-(scores * k).round(decimals=_TIE_DECIMALS), stable=True).indices[:keep]
        keys.append(x.detach()[order].to("cpu", torch.float32))
        inst_idx.append(order.cpu())
        bag_idx.append(torch.full((keep,), pos, dtype=torch.long))
        ranks.append(k)
    if not keys:
        detail = "; ".join(f"bag {p}: {r}" for p, _, r in skipped[:5])
        raise ValueError("select_negative_keys: no usable bag in 'bags'"
                         + (f" ({len(skipped)} skipped: {detail})" if skipped else " (it is empty)"))
    out = torch.cat(keys)
    if not return_info:
        return out
    return KeySelection(out, torch.cat(bag_idx), torch.cat(inst_idx), ranks, skipped)


def is_negative_bag(bag: Any) -> bool:
    """``True`` if the bag's label ``y`` is negative: class ``0`` (binary / multi-class) or all zeros
    (multi-label ``[1, C]``).

    Raises:
        ValueError: if the bag has no ``y``.
    """
    y = getattr(bag, "y", None)
    if y is None:
        raise ValueError("is_negative_bag: the bag has no label 'y'")
    y = torch.as_tensor(y)
    return bool((y == 0).all())


def negative_bags_from_split(dataset: Sequence[Any], indices: Optional[Iterable[int]] = None) -> Iterator[Any]:
    """Yield the negative bags of a training split, one at a time — CASii's training-fold rule.

    The key bank must come only from normal bags of the **training** split (the released CASii code
    also drew keys from bags later used for validation: a leak). Pass the dataset and the training
    indices of the fold; each bag is loaded, kept if :func:`is_negative_bag`, else dropped at once.

    Args:
        dataset: indexable bags (a list of ``Data`` or a PyG dataset).
        indices: training indices (default ``None`` = every bag of ``dataset``).

    Example:
        >>> keys = select_negative_keys(negative_bags_from_split(dataset, train_idx), t=50)  # doctest: +SKIP
    """
    if indices is None:
        indices = range(len(dataset))
    elif isinstance(indices, Tensor):
        indices = indices.view(-1).tolist()
    for i in indices:
        bag = dataset[int(i)]
        if is_negative_bag(bag):
            yield bag
