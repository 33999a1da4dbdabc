r"""Instance-score heatmaps drawn over patch coordinates (and over an H&E image when given).

Colour scales (``scale``):

- per slide: ``"minmax"`` (default) and ``"rank"`` stretch each slide's scores over the whole
  colour map, so every slide uses every colour; ``"raw"`` colours the raw scores over the slide's
  own range. Good for *where* in one slide, useless for comparing two slides.
- absolute: ``"attention"`` (attention weights × bag size, log scale, :data:`ATTENTION_RANGE`),
  ``"probability"`` (``[0, 1]``) and a fixed ``(vmin, vmax)``: one colour scale on every slide,
  so equal values have equal colours across slides. :func:`display_values` turns model outputs
  into these values.

The default colour map is :data:`DEFAULT_CMAP` (``"viridis"``, perceptually uniform).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "DEFAULT_CMAP",
    "ATTENTION_RANGE",
    "SCALES",
    "normalize_scores",
    "display_values",
    "heatmap_title",
    "scale_bar_length",
    "HeatmapArtists",
    "draw_heatmap",
    "plot_heatmap",
    "heatmap_of_prediction",
]

DEFAULT_CMAP = "viridis"
"""Default colour map. ``viridis`` is perceptually uniform (equal score steps look like equal
colour steps; lightness rises monotonically, so it also reads in greyscale and with common
colour-vision deficiencies), and *both* of its ends are saturated: the dark-violet bottom and the
yellow top stand out over a white background, where ``inferno``/``magma`` end in near-white and
vanish. Its blue → green → yellow hues are absent from H&E (pink eosin, purple hematoxylin), so an
overlay stays distinguishable from the stain, whereas the magenta–orange middle of
``inferno``/``magma`` blends into eosin. ``jet`` (the previous default) is not perceptually
uniform: its bright cyan and yellow bands draw edges that are not in the data."""

ATTENTION_RANGE: Tuple[float, float] = (0.01, 100.0)
"""Fixed colour range of the ``"attention"`` scale (attention × N, log scale): ``1`` (uniform
attention) is the middle colour; values from 100× below to 100× above uniform are resolved,
anything outside is clipped to the end colours (the colour bar shows arrows)."""

SCALES = ("minmax", "rank", "raw", "attention", "probability")
"""Named colour scales of :func:`plot_heatmap`; a ``(vmin, vmax)`` pair is accepted too."""

_PER_SLIDE = {"minmax": "per-slide min–max", "rank": "per-slide rank", "raw": "per-slide range"}
_KINDS = ("attention", "logit", "probability", "raw")


def _values(a, name: str, fn: str) -> np.ndarray:
    from graphmil.metrics.bag import to_numpy

    s = to_numpy(a).astype(np.float64).reshape(-1)
    bad = int(np.isnan(s).sum())
    if bad:
        raise ValueError(f"{fn}: '{name}' holds {bad} NaN value(s) of {s.size}")
    return s


def normalize_scores(scores, mode: Optional[str] = "minmax") -> np.ndarray:
    r"""Rescale scores for display.

    .. math::
        \text{minmax: } \tilde s_i = \frac{s_i - \min s}{\max s - \min s}, \qquad
        \text{rank: } \tilde s_i = \frac{\operatorname{rank}(s_i)}{N - 1}

    (``None`` keeps the raw scores). A constant score vector maps to ``0.5``.

    Args:
        scores: ``[N]`` scores.
        mode (str, optional): ``"minmax"`` (default), ``"rank"`` or ``None``.

    Shapes:
        - **scores:** ``[N]``; **output:** ``[N]`` float64.
    """
    from graphmil.metrics.bag import to_numpy

    s = to_numpy(scores).astype(np.float64).reshape(-1)
    if mode is None or s.size == 0:
        return s
    if mode == "minmax":
        lo, hi = np.nanmin(s), np.nanmax(s)
        return np.full_like(s, 0.5) if hi <= lo else (s - lo) / (hi - lo)
    if mode == "rank":
        if s.size == 1:
            return np.full_like(s, 0.5)
        r = np.empty(s.size)
        r[np.argsort(s, kind="stable")] = np.arange(s.size)
        return r / (s.size - 1)
    raise ValueError(f"normalize_scores: 'mode' must be 'minmax', 'rank' or None, got {mode!r}")


def display_values(scores, kind: str, num_instances: Optional[int] = None, index=None,
                   atol: float = 1e-3) -> np.ndarray:
    r"""Turn a model's instance outputs into the values an absolute colour scale shows.

    .. math::
        \text{attention: } v_i = a_i \cdot \frac{N_b}{\sum_{j \in b} a_j}, \qquad
        \text{logit: } v_i = \sigma(z_i) = \frac{1}{1 + e^{-z_i}}, \qquad
        \text{probability: } v_i = p_i

    ``"attention"`` takes softmaxed attention weights (``MILOutput.attention``, the
    ``"attention"`` of :func:`graphmil.train.evaluate` predictions; *not* the attention logits
    ``instance_score``) and returns attention × bag size: ``1`` means the instance gets the
    uniform weight ``1/N``, ``10`` ten times that. The weights of each bag are checked to sum to
    ``1`` (within ``atol``) and renormalised exactly (removing float32 softmax rounding), so
    uniform attention gives exactly ``1``. With ``num_instances`` the scores are a *subset* of a
    bag of that size and are only multiplied (``v_i = a_i N``), not checked or renormalised.
    Show the result with ``scale="attention"``.

    ``"logit"`` (instance logits, e.g. DSMIL's instance classifier) and ``"probability"``
    (already in ``[0, 1]``, checked) give probabilities; show them with ``scale="probability"``.
    ``"raw"`` returns the scores as float64.

    Args:
        scores: ``[N]`` model outputs.
        kind (str): ``"attention"``, ``"logit"``, ``"probability"`` or ``"raw"``.
        num_instances (int, optional): bag size ``N`` when ``scores`` is a subset of one bag
            (``"attention"`` only; default ``None``: the scores are whole bags).
        index (optional): ``[N]`` bag index of each score, for several bags at once (e.g. the
            ``"instance_bag"`` of the predictions; ``"attention"`` only; default ``None``: one bag).
        atol (float): tolerance of the sum-to-one check (default ``1e-3``).

    Returns:
        ``[N]`` float64 display values.

    Raises:
        ValueError: naming the argument, for an unknown ``kind``, NaN ``scores``, negative
            attention or attention not summing to one, probabilities outside ``[0, 1]``,
            ``num_instances`` below 1 or together with ``index``, an ``index`` of another length.

    Shapes:
        - **scores:** ``[N]``; **index:** ``[N]``; **output:** ``[N]``.

    Example:
        >>> display_values(np.full(4, 0.25), "attention")
        array([1., 1., 1., 1.])
        >>> display_values(np.array([0.0]), "logit")
        array([0.5])
    """
    fn = "display_values"
    if kind not in _KINDS:
        raise ValueError(f"{fn}: 'kind' must be one of {', '.join(map(repr, _KINDS))}, got {kind!r}")
    s = _values(scores, "scores", fn)
    if kind == "raw":
        return s
    if kind == "logit":
        e = np.exp(-np.abs(s))  # stable sigmoid: never exp of a large positive number
        return np.where(s >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    if kind == "probability":
        if s.size and (s.min() < 0 or s.max() > 1):
            raise ValueError(f"{fn}: 'scores' must be probabilities in [0, 1] for kind='probability' "
                             f"(got range [{s.min():.4g}, {s.max():.4g}]); pass logits with kind='logit'")
        return s
    # attention
    if s.size and (s.min() < 0 or not np.isfinite(s).all()):
        raise ValueError(f"{fn}: 'scores' must be softmaxed attention weights (finite, >= 0) for "
                         "kind='attention'; attention logits belong on a per-slide scale ('minmax')")
    if num_instances is not None:
        if index is not None:
            raise ValueError(f"{fn}: pass 'num_instances' (a subset of one bag) or 'index' "
                             "(whole bags), not both")
        if int(num_instances) < 1:
            raise ValueError(f"{fn}: 'num_instances' must be >= 1, got {num_instances}")
        return s * float(int(num_instances))
    if index is None:
        idx = np.zeros(s.size, dtype=np.int64)
    else:
        from graphmil.metrics.bag import to_numpy

        idx = to_numpy(index).astype(np.int64).reshape(-1)
        if idx.size != s.size:
            raise ValueError(f"{fn}: 'index' has {idx.size} entries for {s.size} scores")
        if idx.size and idx.min() < 0:
            raise ValueError(f"{fn}: 'index' must be >= 0")
    out = np.empty_like(s)
    for b in np.unique(idx):
        m = idx == b
        a = s[m]
        total = math.fsum(a.tolist())  # correctly rounded: uniform a gives a*N/total == 1 exactly
        if abs(total - 1.0) > atol:
            where = "" if index is None else f" of bag {int(b)}"
            raise ValueError(f"{fn}: the attention 'scores'{where} sum to {total:.6g}, not 1; pass "
                             "softmaxed attention of whole bags, or 'num_instances' for a subset")
        out[m] = a * float(a.size) / total
    return out


def heatmap_title(slide_id: Any = None, label_name: Optional[str] = None, prob: Optional[float] = None,
                  prob_name: Optional[str] = None, pred_name: Optional[str] = None,
                  extra: Optional[str] = None) -> str:
    r"""The title of a slide's heatmap, with the labels' original names.

    ``"<slide_id>: label <label_name>, p(<prob_name>) = <prob>, pred <pred_name>; <extra>"``, each
    part left out when ``None``; ``p = <prob>`` when ``prob_name`` is ``None``. Class names come
    from the dataset, e.g. ``names = {i: s for s, i in ds.label_map.items()}`` for
    :class:`~graphmil.datasets.FeatureBagDataset`.

    Args:
        slide_id (optional): slide / bag name (default ``None``: left out).
        label_name (str, optional): the true label's name (default ``None``).
        prob (float, optional): a predicted probability, written with two decimals (default ``None``).
        prob_name (str, optional): the class ``prob`` is the probability of (default ``None``).
        pred_name (str, optional): the predicted class's name (default ``None``).
        extra (str, optional): appended after ``"; "`` (model name, legend...; default ``None``).

    Returns:
        The title (``""`` when everything is ``None``).

    Raises:
        ValueError: naming ``prob`` when it is NaN or outside ``[0, 1]``.

    Example:
        >>> heatmap_title("TCGA-01", label_name="tumor", prob=0.912, prob_name="tumor")
        'TCGA-01: label tumor, p(tumor) = 0.91'
    """
    parts = []
    if label_name is not None:
        parts.append(f"label {label_name}")
    if prob is not None:
        p = float(prob)
        if not 0.0 <= p <= 1.0:  # also catches NaN
            raise ValueError(f"heatmap_title: 'prob' must be a probability in [0, 1], got {prob!r}")
        parts.append(f"p({prob_name}) = {p:.2f}" if prob_name is not None else f"p = {p:.2f}")
    if pred_name is not None:
        parts.append(f"pred {pred_name}")
    body = ", ".join(parts)
    head = "" if slide_id is None else str(slide_id)
    title = f"{head}: {body}" if head and body else head or body
    if extra:
        title = f"{title}; {extra}" if title else str(extra)
    return title


def scale_bar_length(extent: float, fraction: float = 0.2) -> float:
    r"""A round scale-bar length for a view ``extent`` units wide.

    .. math::
        L = \operatorname*{arg\,min}_{L \in \{1, 2, 5\} \times 10^k}
            \bigl|\log L - \log(f \cdot \text{extent})\bigr|

    (ties go to the shorter bar), so the bar is about ``fraction`` of the width, between ~0.13
    and ~0.32 of it for ``fraction = 0.2``.

    Args:
        extent (float): width of the view in data units (level-0 px, or µm), ``> 0``.
        fraction (float): target fraction of the width (default ``0.2``).

    Returns:
        ``L`` (e.g. ``1000.0``, ``2000.0``, ``5000.0``).

    Example:
        >>> scale_bar_length(9000)
        2000.0
    """
    if not (extent > 0 and math.isfinite(extent)):
        raise ValueError(f"scale_bar_length: 'extent' must be a positive number, got {extent!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"scale_bar_length: 'fraction' must be in (0, 1], got {fraction!r}")
    t = extent * fraction
    k = math.floor(math.log10(t))
    cands = [m * 10.0 ** e for e in (k - 1, k, k + 1) for m in (1, 2, 5)]
    return float(min(cands, key=lambda c: (abs(math.log(c / t)), c)))


def _fmt_len(v: float) -> str:
    return f"{int(round(v)):,}" if v >= 1 and abs(v - round(v)) < 1e-9 * max(1.0, v) else f"{v:g}"


def resolve_scale(scale, normalize, fn: str):
    """(name or tuple) from the new ``scale`` and the legacy ``normalize``."""
    if scale is None:
        if normalize not in ("minmax", "rank", None):
            raise ValueError(f"{fn}: 'normalize' must be 'minmax', 'rank' or None, got {normalize!r}")
        return "raw" if normalize is None else normalize
    if normalize != "minmax" and not (isinstance(scale, str) and normalize == scale):
        raise ValueError(f"{fn}: pass the colour scale as 'scale' only (got scale={scale!r} and "
                         f"normalize={normalize!r})")
    if isinstance(scale, str):
        if scale not in SCALES:
            raise ValueError(f"{fn}: 'scale' must be one of {', '.join(map(repr, SCALES))} or a "
                             f"(vmin, vmax) pair, got {scale!r}")
        return scale
    try:
        lo, hi = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: 'scale' must be one of {', '.join(map(repr, SCALES))} or a "
                         f"(vmin, vmax) pair, got {scale!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{fn}: 'scale' = (vmin, vmax) needs finite vmin < vmax, got {scale!r}")
    return (lo, hi)


def colour_setup(s: np.ndarray, scale, attention_range, colorbar_label, fn: str):
    """Return (colour values, norm, colour-bar label, colour-bar extend)."""
    import matplotlib.colors as mcolors

    if isinstance(scale, tuple):
        lo, hi = scale
        what = colorbar_label or "instance score"
        return (np.clip(s, lo, hi), mcolors.Normalize(lo, hi),
                f"{what} (absolute, fixed range {lo:g} to {hi:g})", "both")
    if scale == "attention":
        lo, hi = (float(v) for v in attention_range)
        if not (0 < lo < 1 < hi and math.isfinite(hi)):
            raise ValueError(f"{fn}: 'attention_range' must be (lo, hi) with 0 < lo < 1 < hi, "
                             f"got {attention_range!r}")
        if s.size > 1 and abs(math.fsum(s.tolist()) - 1.0) < 1e-6:
            raise ValueError(f"{fn}: 'scores' sum to 1: these look like attention weights, but "
                             "scale='attention' shows attention × N; pass "
                             "display_values(attention, 'attention')")
        if s.min() < 0:
            raise ValueError(f"{fn}: 'scores' must be >= 0 for scale='attention' (attention × N)")
        what = colorbar_label or "attention × N"
        return (np.clip(s, lo, hi), mcolors.LogNorm(lo, hi),
                f"{what} (absolute, log scale; 1 = uniform)", "both")
    if scale == "probability":
        if s.min() < 0 or s.max() > 1:
            raise ValueError(f"{fn}: 'scores' must be in [0, 1] for scale='probability' (got range "
                             f"[{s.min():.4g}, {s.max():.4g}]); pass display_values(logits, 'logit')")
        what = colorbar_label or "instance probability"
        return s, mcolors.Normalize(0.0, 1.0), f"{what} (absolute, 0 to 1)", "neither"
    what = colorbar_label or "instance score"
    label = f"{what} ({_PER_SLIDE[scale]})"
    if scale == "raw":
        lo, hi = float(s.min()), float(s.max())
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        return s, mcolors.Normalize(lo, hi), label, "neither"
    return normalize_scores(s, scale), mcolors.Normalize(0.0, 1.0), label, "neither"


@dataclass
class HeatmapArtists:
    """What :func:`draw_heatmap` drew.

    Attributes:
        mappable: the scores' ``PatchCollection`` (squares) or ``PathCollection`` (dots); its
            ``norm`` and ``cmap`` are the colour scale (``mappable.to_rgba(v)`` is the colour of
            value ``v``).
        values: ``[N]`` the values handed to the colour map (normalised or clipped scores).
        colorbar: the ``Colorbar`` (or ``None``).
        colorbar_label (str): its label, naming the scale.
        scale_bar: the ``AnchoredSizeBar`` (or ``None``).
        scale_bar_length (float, optional): its length in data units (px of ``pos``).
        scale_bar_label (str, optional): its text, e.g. ``"2,000 px (level 0)"``.
    """

    mappable: Any
    values: np.ndarray
    colorbar: Any = None
    colorbar_label: str = ""
    scale_bar: Any = None
    scale_bar_length: Optional[float] = None
    scale_bar_label: Optional[str] = None


def draw_heatmap(ax, pos, scores, image=None, patch_size: Optional[float] = None, *,
                 scale: Union[str, Sequence[float]] = "minmax", cmap: str = DEFAULT_CMAP,
                 alpha: Optional[float] = None, point_size: Optional[float] = None, labels=None,
                 title: Optional[str] = None, colorbar: bool = True,
                 colorbar_label: Optional[str] = None, scale_bar: Optional[bool] = None,
                 mpp: Optional[float] = None,
                 attention_range: Tuple[float, float] = ATTENTION_RANGE) -> HeatmapArtists:
    r"""Draw instance scores over their coordinates on a matplotlib ``ax``.

    What :func:`plot_heatmap` draws (same colour scales and scale bar), on an axes of the
    caller's figure: e.g. several slides side by side with one absolute ``scale``.

    Args:
        ax: a matplotlib ``Axes``.
        pos: ``[N, 2]`` coordinates ``(x, y)``.
        scores: ``[N]`` values to colour.
        image: optional background image (default ``None``).
        patch_size (float, optional): side of the squares; ``None`` (default) draws dots.
        scale: as in :func:`plot_heatmap` (default ``"minmax"``).
        cmap (str): default :data:`DEFAULT_CMAP`.
        alpha (float, optional): opacity (default ``None``: as in :func:`plot_heatmap`).
        point_size (float, optional): dot area in points² (default ``None``).
        labels: optional ``[N]`` instance labels, ``> 0`` outlined (default ``None``).
        title (str, optional): axes title (default ``None``).
        colorbar (bool): draw a colour bar beside ``ax`` (default ``True``).
        colorbar_label (str, optional): the quantity's name (default ``None``: from ``scale``).
        scale_bar (bool, optional): default ``None``: for grid patches only.
        mpp (float, optional): microns per pixel of ``pos`` (default ``None``).
        attention_range (tuple): default :data:`ATTENTION_RANGE`.

    Returns:
        :class:`HeatmapArtists`.

    Shapes:
        - **pos:** ``[N, 2]``; **scores:** ``[N]``; **image:** ``[H, W, 3]`` or ``[H, W]``.
    """
    fn = "draw_heatmap"
    return _draw(fn, ax, pos, scores, image, patch_size, resolve_scale(scale, "minmax", fn), cmap,
                 alpha, point_size, labels, title, colorbar, colorbar_label, scale_bar, mpp,
                 attention_range)


def _draw(fn, ax, pos, scores, image, patch_size, sc, cmap, alpha, point_size, labels, title,
          colorbar, colorbar_label, scale_bar, mpp, attention_range) -> HeatmapArtists:
    from matplotlib import colormaps
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    from graphmil.metrics.bag import to_numpy

    p = to_numpy(pos).astype(np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"{fn}: 'pos' must be [N, 2], got shape {p.shape}")
    s = _values(scores, "scores", fn)
    if p.shape[0] != s.size:
        raise ValueError(f"{fn}: 'pos' has {p.shape[0]} rows but 'scores' has {s.size}")
    if s.size == 0:
        raise ValueError(f"{fn}: no instances to draw ('scores' is empty)")
    if not np.isfinite(s).all():
        raise ValueError(f"{fn}: 'scores' holds {int((~np.isfinite(s)).sum())} infinite value(s)")
    if not np.isfinite(p[:, :2]).all():
        raise ValueError(f"{fn}: 'pos' holds non-finite coordinates")
    if patch_size is not None and not float(patch_size) > 0:
        raise ValueError(f"{fn}: 'patch_size' must be > 0, got {patch_size!r}")
    if mpp is not None and not (float(mpp) > 0 and math.isfinite(float(mpp))):
        raise ValueError(f"{fn}: 'mpp' must be a positive number (microns per pixel), got {mpp!r}")
    if cmap not in colormaps:
        raise ValueError(f"{fn}: 'cmap' {cmap!r} is not a matplotlib colour map")
    cm = colormaps[cmap]
    c, norm, cb_label, extend = colour_setup(s, sc, attention_range, colorbar_label, fn)
    lab = None
    if labels is not None:
        lab = to_numpy(labels).reshape(-1)
        if lab.size != s.size:
            raise ValueError(f"{fn}: 'labels' has {lab.size} entries for {s.size} instances")
    if alpha is None:
        alpha = (0.45 if patch_size is not None else 0.85) if image is not None else 1.0
    img = None
    if image is not None:
        img = to_numpy(image)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
    if patch_size is not None:
        ps = float(patch_size)
        coll = PatchCollection([Rectangle((x, y), ps, ps) for x, y in p[:, :2]], cmap=cm, norm=norm,
                               alpha=alpha, linewidths=0)
        coll.set_array(c)
        ax.add_collection(coll)
        mappable = coll
        lo, hi = p[:, :2].min(0), p[:, :2].max(0) + ps
    else:
        size = point_size if point_size is not None else (
            40.0 if image is not None else float(np.clip(4000.0 / s.size, 4, 60)))
        mappable = ax.scatter(p[:, 0], p[:, 1], c=c, cmap=cm, norm=norm, s=size, alpha=alpha,
                              linewidths=0)
        pad = 0.02 * max(1.0, float(np.ptp(p[:, :2], axis=0).max()))
        lo, hi = p[:, :2].min(0) - pad, p[:, :2].max(0) + pad
    if lab is not None:
        m = lab > 0
        if m.any():
            if patch_size is not None:
                ax.add_collection(PatchCollection([Rectangle((x, y), ps, ps) for x, y in p[m, :2]],
                                                  facecolor="none", edgecolor="white", linewidths=1.6))
            else:
                ax.scatter(p[m, 0], p[m, 1], facecolors="none", edgecolors="white",
                           s=size * 2.5, linewidths=1.0)
    if img is not None:
        h, w = img.shape[:2]
        x0, x1, y0, y1 = 0.0, float(w), 0.0, float(h)
    else:
        x0, x1, y0, y1 = float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])
        ax.set_facecolor("#f2f2f2")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)  # y down (image convention)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    art = HeatmapArtists(mappable=mappable, values=c, colorbar_label=cb_label)
    if colorbar:
        cb = ax.figure.colorbar(mappable, ax=ax, fraction=0.046, pad=0.04, extend=extend)
        cb.set_label(cb_label)
        if sc == "attention":
            lo_a, hi_a = (float(v) for v in attention_range)
            ticks = [10.0 ** k for k in range(math.ceil(math.log10(lo_a) - 1e-9),
                                              math.floor(math.log10(hi_a) + 1e-9) + 1)]
            cb.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
        art.colorbar = cb
    if scale_bar is None:
        scale_bar = patch_size is not None
    if scale_bar:
        from matplotlib.font_manager import FontProperties
        from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

        px_unit = "px (level 0)" if patch_size is not None else "px"
        width = x1 - x0
        if mpp is not None:
            um = scale_bar_length(width * float(mpp))
            length = um / float(mpp)
            bits = px_unit.split(" ", 1)
            px_txt = f"{_fmt_len(round(length))} {bits[0]}" + (", level 0" if len(bits) > 1 else "")
            text = f"{_fmt_len(um)} µm ({px_txt})"
        else:
            length = scale_bar_length(width)
            text = f"{_fmt_len(length)} {px_unit}"
        bar = AnchoredSizeBar(ax.transData, length, text, loc="lower right", pad=0.4, borderpad=0.5,
                              sep=3, color="black", frameon=True, size_vertical=0.012 * (y1 - y0),
                              fontproperties=FontProperties(size=8))
        bar.patch.set_facecolor("white")
        bar.patch.set_alpha(0.75)
        bar.patch.set_edgecolor("none")
        ax.add_artist(bar)
        art.scale_bar, art.scale_bar_length, art.scale_bar_label = bar, float(length), text
    return art


def plot_heatmap(pos, scores, path: str, image=None, patch_size: Optional[float] = None,
                 title: Optional[str] = None, normalize: Optional[str] = "minmax",
                 cmap: str = DEFAULT_CMAP, alpha: Optional[float] = None,
                 point_size: Optional[float] = None, labels=None,
                 colorbar_label: Optional[str] = None, dpi: int = 120, overwrite: bool = False, *,
                 scale: Union[str, Sequence[float], None] = None, mpp: Optional[float] = None,
                 scale_bar: Optional[bool] = None,
                 attention_range: Tuple[float, float] = ATTENTION_RANGE) -> str:
    r"""Draw instance scores over their coordinates and save a PNG.

    Grid patches (``patch_size`` given) are drawn as squares of side ``patch_size`` whose top-left
    corner is ``pos`` (the CLAM/TRIDENT convention: level-0 top-left pixel); point instances
    (nuclei, ``patch_size=None``) as dots centred on ``pos``. With ``image`` (an ``[H, W, 3]``
    array in the same pixel frame as ``pos``, e.g. a colon-cancer H&E image) the scores are
    overlaid semi-transparently. The y axis points down (image convention).

    Colour scale (``scale``; the colour bar's label names it):

    .. math::
        \text{minmax: } c_i = \frac{s_i - \min s}{\max s - \min s}, \quad
        \text{rank: } c_i = \frac{\operatorname{rank}(s_i)}{N - 1}, \quad
        \text{attention: } c_i = \frac{\log (v_i / \ell)}{\log (h / \ell)}, \quad
        \text{probability: } c_i = p_i, \quad
        (v_0, v_1)\text{: } c_i = \frac{s_i - v_0}{v_1 - v_0}

    with :math:`c_i` clipped to ``[0, 1]`` and :math:`(\ell, h)` = ``attention_range``. The first
    two (and ``"raw"``, the raw scores over the slide's own range) are **per slide**: the slide's
    top score always gets the top colour, so colours cannot be compared across slides.
    ``"attention"`` (``scores`` = attention × N from :func:`display_values`, ``1`` = uniform,
    log scale over :data:`ATTENTION_RANGE` = ``(0.01, 100)``), ``"probability"`` (``scores`` in
    ``[0, 1]``) and ``(vmin, vmax)`` are **absolute**: the same value has the same colour on
    every slide.

    Grid-patch heatmaps get a scale bar of a round length (:func:`scale_bar_length`, ~1/5 of the
    width) labelled in level-0 pixels, e.g. ``"2,000 px (level 0)"``; with ``mpp`` the round
    length is in microns: ``"500 µm (2,000 px, level 0)"``.

    Args:
        pos: ``[N, 2]`` coordinates ``(x, y)``.
        scores: ``[N]`` values to colour (attention logits, attention × N, probabilities...);
            NaN is refused.
        path (str): output ``.png`` path; its folder is created; an existing file is refused
            unless ``overwrite``.
        image: optional ``[H, W, 3]`` (or ``[H, W]``) background image (default ``None``).
        patch_size (float, optional): side of the squares in ``pos`` units; ``None`` (default)
            draws dots.
        title (str, optional): figure title (default ``None``; see :func:`heatmap_title`).
        normalize (str, optional): legacy name of the per-slide scales, used when ``scale`` is
            ``None``: ``"minmax"`` (default), ``"rank"`` or ``None`` (= ``scale="raw"``).
        cmap (str): matplotlib colour map (default :data:`DEFAULT_CMAP` = ``"viridis"``).
        alpha (float, optional): opacity (default over an image ``0.45`` for squares, ``0.85`` for
            dots; else ``1``).
        point_size (float, optional): dot area in points² (default ``40`` over an image, else from
            the number of dots).
        labels: optional ``[N]`` instance labels; instances with label ``> 0`` are outlined in white.
        colorbar_label (str, optional): the quantity's name (default ``None``: ``"instance
            score"``, ``"attention × N"`` or ``"instance probability"`` after ``scale``); the scale
            is always appended, e.g. ``"attention logit (per-slide min–max)"``.
        dpi (int): default ``120``.
        overwrite (bool): default ``False``.
        scale: ``"minmax"``, ``"rank"``, ``"raw"``, ``"attention"``, ``"probability"`` or a
            ``(vmin, vmax)`` pair (default ``None``: from ``normalize``, i.e. ``"minmax"``).
        mpp (float, optional): microns per pixel of ``pos`` (level 0); the scale bar is then in
            round microns (default ``None``: round pixels).
        scale_bar (bool, optional): draw the scale bar (default ``None``: for grid patches only).
        attention_range (tuple): ``(lo, hi)`` of the ``"attention"`` scale, ``0 < lo < 1 < hi``
            (default :data:`ATTENTION_RANGE`); keep it fixed across slides you compare.

    Returns:
        ``path``.

    Raises:
        ValueError: naming the argument, for a bad ``pos`` shape, ``pos``/``scores``/``labels``
            lengths that differ, NaN or infinite ``scores``, an unknown ``scale``/``normalize``/
            ``cmap``, values outside ``[0, 1]`` for ``"probability"``, attention weights (summing
            to 1) or negative values for ``"attention"``, a ``path`` not ending in ``.png`` or
            already existing.

    Shapes:
        - **pos:** ``[N, 2]``; **scores:** ``[N]``; **labels:** ``[N]``; **image:** ``[H, W, 3]``.

    Example:
        >>> a = display_values(attention, "attention")             # softmaxed weights of one bag
        >>> plot_heatmap(bag.pos, a, "bag.png", patch_size=256, scale="attention",
        ...              title=heatmap_title("TCGA-01", "tumor", prob=0.91, prob_name="tumor"))
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fn = "plot_heatmap"
    sc = resolve_scale(scale, normalize, fn)
    if not str(path).lower().endswith(".png"):
        raise ValueError(f"plot_heatmap: 'path' must end in .png, got '{path}'")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"plot_heatmap: '{path}' already exists (pass overwrite=True to replace it)")
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    try:
        _draw(fn, ax, pos, scores, image, patch_size, sc, cmap, alpha, point_size, labels, title,
              True, colorbar_label, scale_bar, mpp, attention_range)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def heatmap_of_prediction(record, path: str, class_names: Optional[Sequence[str]] = None, image=None,
                          patch_size: Optional[float] = None, scale: str = "minmax",
                          outline_labels: bool = True, title_prefix: Optional[str] = None,
                          note: Optional[str] = None, **kwargs) -> str:
    r"""Draw one :class:`graphmil.train.BagPrediction` (a record of :func:`graphmil.train.predict`)
    as a heatmap PNG: positions, scores and labels all come from the record, nothing is re-read.

    The values drawn depend on ``scale``: ``"minmax"`` / ``"rank"`` draw the instance scores per
    slide; ``"attention"`` draws attention × N (:func:`display_values`, the head mean for several
    heads; ``1`` = uniform) and ``"probability"`` the sigmoid of the instance scores, both on one
    absolute scale shared by every slide. The title names the slide, its label's original name and
    the predicted probability (:func:`heatmap_title`).

    Args:
        record: a ``BagPrediction`` with ``pos`` and ``instance_scores``.
        path (str): the PNG to write.
        class_names (list of str, optional): class names (default: ``"0"``, ``"1"``, ...).
        image: an ``[H, W, 3]`` background in the frame of ``pos`` (default ``None``).
        patch_size (float, optional): tile side in ``pos`` units (default: the record's
            ``patch_size_level0``, when it has one and no ``image`` is given).
        scale (str): ``"minmax"`` (default), ``"rank"``, ``"attention"`` or ``"probability"``.
        outline_labels (bool): outline instances with a positive ``y_inst`` (default ``True``).
        title_prefix (str, optional): text before the slide id in the title.
        note (str, optional): text after the title (e.g. ``"outlined = tumour"``).
        **kwargs: passed to :func:`plot_heatmap` (``dpi``, ``mpp``, ``overwrite``, ...).

    Returns:
        The path written.

    Raises:
        ValueError: a record without positions or the values ``scale`` needs.
    """
    if record.pos is None:
        raise ValueError(f"heatmap_of_prediction: slide '{record.slide_id}' has no positions ('pos')")
    names = list(class_names) if class_names is not None else [str(c) for c in range(len(record.probabilities))]
    if scale == "attention":
        if record.attention is None:
            raise ValueError(f"heatmap_of_prediction: scale='attention' needs attention weights; the model "
                             f"gives none for slide '{record.slide_id}'")
        a = record.attention if record.attention.ndim == 1 else record.attention.mean(axis=1)
        values, label = display_values(a, "attention"), "attention"
    else:
        if record.instance_scores is None:
            raise ValueError(f"heatmap_of_prediction: the model gives no instance scores for slide '{record.slide_id}'")
        raw = record.score()
        if scale == "probability":
            values, label = display_values(raw, "logit"), "instance probability"
        else:
            values, label = raw, "instance score"
    if patch_size is None and image is None:
        ps = record.meta.get("patch_size_level0")
        patch_size = float(ps) if ps is not None and float(ps) > 0 else None
    p = record.probabilities
    positive = names[1] if len(p) == 2 else None
    pred = record.prediction()
    title = heatmap_title(
        f"{title_prefix} {record.slide_id}" if title_prefix else record.slide_id,
        label_name=names[record.label] if record.label is not None and record.label < len(names) else None,
        prob=float(p[1]) if positive is not None else float(p[pred]),
        prob_name=positive if positive is not None else names[pred],
        pred_name=names[pred] if pred < len(names) else str(pred), extra=note)
    return plot_heatmap(record.pos, values, path, image=image, patch_size=patch_size, title=title,
                        labels=record.y_inst if outline_labels else None, colorbar_label=label,
                        scale=scale, **kwargs)
