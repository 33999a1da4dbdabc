"""Instance-score heatmaps drawn over patch coordinates (and over an H&E image when given)."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

__all__ = ["plot_heatmap", "normalize_scores"]


def normalize_scores(scores, mode: Optional[str] = "minmax") -> np.ndarray:
    r"""Rescale scores for display.

    .. math::
        \text{minmax: } \tilde s_i = \frac{s_i - \min s}{\max s - \min s}, \qquad
        \text{rank: } \tilde s_i = \frac{\operatorname{rank}(s_i)}{N - 1}

    (``None`` keeps the raw scores). A constant score vector maps to ``0.5``.
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


def plot_heatmap(pos, scores, path: str, image=None, patch_size: Optional[float] = None,
                 title: Optional[str] = None, normalize: Optional[str] = "minmax",
                 cmap: str = "jet", alpha: Optional[float] = None, point_size: Optional[float] = None,
                 labels=None, colorbar_label: str = "instance score", dpi: int = 120,
                 overwrite: bool = False) -> str:
    r"""Draw instance scores over their coordinates and save a PNG.

    Grid patches (``patch_size`` given) are drawn as squares of side ``patch_size`` whose top-left
    corner is ``pos`` (the CLAM/TRIDENT convention: level-0 top-left pixel); point instances
    (nuclei, ``patch_size=None``) as dots centred on ``pos``. With ``image`` (an ``[H, W, 3]``
    array in the same pixel frame as ``pos``, e.g. a colon-cancer H&E image) the scores are
    overlaid semi-transparently. The y axis points down (image convention). Colour:
    :func:`normalize_scores` of the scores, with a colour bar.

    Args:
        pos: ``[N, 2]`` coordinates ``(x, y)``.
        scores: ``[N]`` instance scores (attention logits, probabilities...).
        path (str): output ``.png`` path; its folder is created; an existing file is refused
            unless ``overwrite``.
        image: optional ``[H, W, 3]`` (or ``[H, W]``) background image.
        patch_size (float, optional): side of the squares; ``None`` draws dots.
        title (str, optional): figure title.
        normalize (str, optional): ``"minmax"`` (default), ``"rank"`` or ``None``.
        cmap (str): matplotlib colour map (default ``"jet"``).
        alpha (float, optional): opacity (default over an image ``0.45`` for squares, ``0.85`` for
            dots; else ``1``).
        point_size (float, optional): dot area in points² (default ``40`` over an image, else from
            the number of dots).
        labels: optional ``[N]`` instance labels; instances with label ``> 0`` are outlined in white.
        colorbar_label (str): default ``"instance score"``.
        dpi (int): default ``120``.
        overwrite (bool): default ``False``.

    Returns:
        ``path``.

    Shapes:
        - **pos:** ``[N, 2]``; **scores:** ``[N]``; **image:** ``[H, W, 3]``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    from graphmil.metrics.bag import to_numpy

    p = to_numpy(pos).astype(np.float64)
    s = to_numpy(scores).astype(np.float64).reshape(-1)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"plot_heatmap: 'pos' must be [N, 2], got shape {p.shape}")
    if p.shape[0] != s.size:
        raise ValueError(f"plot_heatmap: 'pos' has {p.shape[0]} rows but 'scores' has {s.size}")
    if s.size == 0:
        raise ValueError("plot_heatmap: no instances to draw")
    if not path.lower().endswith(".png"):
        raise ValueError(f"plot_heatmap: 'path' must end in .png, got '{path}'")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"plot_heatmap: '{path}' already exists (pass overwrite=True to replace it)")
    c = normalize_scores(s, normalize)
    vmin, vmax = (0.0, 1.0) if normalize else (float(np.nanmin(s)), float(np.nanmax(s)))
    if alpha is None:
        alpha = (0.45 if patch_size is not None else 0.85) if image is not None else 1.0
    cm = plt.get_cmap(cmap)
    norm = matplotlib.colors.Normalize(vmin=vmin, vmax=vmax)

    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    if image is not None:
        img = to_numpy(image)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
    if patch_size is not None:
        ps = float(patch_size)
        rects = [Rectangle((x, y), ps, ps) for x, y in p[:, :2]]
        coll = PatchCollection(rects, cmap=cm, norm=norm, alpha=alpha, linewidths=0)
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
    if labels is not None:
        lab = to_numpy(labels).reshape(-1)
        if lab.size != s.size:
            raise ValueError(f"plot_heatmap: 'labels' has {lab.size} entries for {s.size} instances")
        m = lab > 0
        if m.any():
            if patch_size is not None:
                ps = float(patch_size)
                outl = PatchCollection([Rectangle((x, y), ps, ps) for x, y in p[m, :2]],
                                       facecolor="none", edgecolor="white", linewidths=1.6)
                ax.add_collection(outl)
            else:
                ax.scatter(p[m, 0], p[m, 1], facecolors="none", edgecolors="white",
                           s=size * 2.5, linewidths=1.0)
    if image is not None:
        h, w = img.shape[:2]
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
    else:
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(hi[1], lo[1])
        ax.set_facecolor("#f2f2f2")
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    cb = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label(colorbar_label + (f" ({normalize})" if normalize else ""))
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
