r"""Heatmaps over the whole-slide image itself: a thumbnail read from a pyramid level near the
requested width, with the tiles' colours blended onto the tissue.

Geometry: a thumbnail of width :math:`W_t` of a slide of level-0 width :math:`W_0` has the
downsample :math:`d = W_0 / W_t`; tile :math:`i` (top-left ``pos[i] = (x_i, y_i)``, side
:math:`s` = ``patch_size_level0``, level-0 px) covers the thumbnail pixels
:math:`[\operatorname{round}(x_i/d), \operatorname{round}((x_i+s)/d)) \times
[\operatorname{round}(y_i/d), \operatorname{round}((y_i+s)/d))` (at least one pixel). Where
patches overlap (step < :math:`s`) a pixel shows the mean value of the tiles covering it.
The blend is :math:`\text{out} = (1-\alpha)\,\text{slide} + \alpha\,\text{cmap}(v)` on covered
pixels, the slide alone elsewhere, so the tissue stays visible through the colours.

Slides are opened with `tiffslide <https://github.com/Bayer-Group/tiffslide>`_ (pyramidal TIFF,
SVS, NDPI, ...; ``pip install 'graphmil[slides]'``) or OpenSlide (``openslide-python``, when
installed, for the formats tiffslide does not read).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from graphmil.viz.heatmap import ATTENTION_RANGE, DEFAULT_CMAP

__all__ = ["SLIDE_EXTENSIONS", "MAX_THUMBNAIL_READ", "find_slide", "open_slide", "slide_thumbnail",
           "slide_mpp", "rasterize_tiles", "blend_heatmap", "Overlay", "overlay_heatmap"]

PathLike = Union[str, os.PathLike]

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".qptiff", ".mrxs", ".vms",
                    ".vmu", ".svslide")
"""Whole-slide image file extensions :func:`find_slide` looks for, in this order."""

MAX_THUMBNAIL_READ = 1 << 26
"""Most pixels (64 M) :func:`slide_thumbnail` reads from one pyramid level; a slide whose
smallest level wider than the thumbnail is larger than that needs a pyramid."""

_TIFF_LIKE = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".qptiff")


def find_slide(slides_dir: PathLike, slide_id: str) -> Optional[Path]:
    """The whole-slide image ``<slides_dir>/<slide_id>.<ext>`` for the first extension of
    :data:`SLIDE_EXTENSIONS` that exists (case-insensitive), else ``None``.

    Args:
        slides_dir: the folder of slide files.
        slide_id (str): the slide id (the file stem).

    Raises:
        ValueError: ``slides_dir`` is not a folder.
    """
    d = Path(slides_dir)
    if not d.is_dir():
        raise ValueError(f"slides folder '{slides_dir}' is not a folder")
    for ext in SLIDE_EXTENSIONS:
        for e in (ext, ext.upper()):
            p = d / f"{slide_id}{e}"
            if p.is_file():
                return p
    return None


def open_slide(path: PathLike):
    """Open a whole-slide image: tiffslide for TIFF-family files (``.svs``, ``.tif``, ``.ndpi``,
    ...), OpenSlide (when ``openslide-python`` is installed) for the rest or when tiffslide fails.

    Args:
        path: the slide file.

    Returns:
        A slide object with the OpenSlide API (``dimensions``, ``level_count``,
        ``level_dimensions``, ``level_downsamples``, ``read_region``, ``properties``, ``close``).

    Raises:
        FileNotFoundError: naming the file when it does not exist.
        ValueError: naming the file when no installed reader opens it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"slide file '{path}' does not exist")
    errors = []
    if path.suffix.lower() in _TIFF_LIKE:
        try:
            import tiffslide
        except ImportError:
            errors.append("tiffslide is not installed (pip install 'graphmil[slides]')")
        else:
            try:
                return tiffslide.TiffSlide(str(path))
            except Exception as e:  # tiffslide raises many kinds for unsupported files
                errors.append(f"tiffslide: {type(e).__name__}: {e}")
    try:
        import openslide
    except ImportError:
        errors.append("openslide-python is not installed")
    else:
        try:
            return openslide.OpenSlide(str(path))
        except Exception as e:
            errors.append(f"openslide: {type(e).__name__}: {e}")
    raise ValueError(f"cannot open slide '{path}': " + "; ".join(errors))


def slide_mpp(slide) -> Optional[float]:
    """Microns per level-0 pixel from the slide's properties (``tiffslide.mpp-x`` /
    ``openslide.mpp-x``), ``None`` when absent."""
    props = getattr(slide, "properties", {}) or {}
    for key in ("tiffslide.mpp-x", "openslide.mpp-x"):
        try:
            v = float(props.get(key))
        except (TypeError, ValueError):
            continue
        if v > 0 and math.isfinite(v):
            return v
    return None


def _to_rgb(img) -> np.ndarray:
    from PIL import Image

    if not isinstance(img, Image.Image):
        img = Image.fromarray(np.asarray(img))
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return np.asarray(img.convert("RGB"))


def slide_thumbnail(path: PathLike, width: int = 2000, slide=None) -> Tuple[np.ndarray, float]:
    r"""Read an RGB thumbnail about ``width`` pixels wide from the pyramid level nearest above it.

    The level read is the coarsest whose width is ``>= width`` (level 0 when none is), resized to
    :math:`W_t = \min(\text{width}, W_0)` pixels wide and :math:`\operatorname{round}(H_0 / d)`
    high, with :math:`d = W_0 / W_t`. Transparent pixels (outside the scanned area) become white.

    Args:
        path: the slide file (:func:`open_slide`).
        width (int): target width in pixels (default ``2000``).
        slide (optional): an already open slide (default ``None``: opened and closed here).

    Returns:
        ``(rgb, downsample)``: ``[H_t, W_t, 3]`` uint8 and :math:`d` (level-0 px per thumbnail px).

    Raises:
        ValueError: naming the file, for ``width < 1`` or a level too large to read
            (:data:`MAX_THUMBNAIL_READ`).
    """
    from PIL import Image

    if int(width) < 1:
        raise ValueError(f"slide_thumbnail: 'width' must be >= 1, got {width!r}")
    own = slide is None
    slide = open_slide(path) if own else slide
    try:
        w0, h0 = (int(v) for v in slide.dimensions)
        dims = [tuple(int(v) for v in d) for d in slide.level_dimensions]
        level = 0
        for k, (w, _) in enumerate(dims):
            if w >= int(width):
                level = k  # levels get coarser with k: keep the last one still wide enough
        lw, lh = dims[level]
        if lw * lh > MAX_THUMBNAIL_READ:
            raise ValueError(f"slide '{path}': the level read for a {width}-px thumbnail is {lw} x {lh} px "
                             f"(more than {MAX_THUMBNAIL_READ:,} px); the file has no pyramid level near that "
                             "width (re-save it as a pyramidal TIFF)")
        img = slide.read_region((0, 0), level, (lw, lh))
        rgb = _to_rgb(img)
    finally:
        if own:
            slide.close()
    wt = min(int(width), w0)
    d = w0 / wt
    ht = max(1, int(round(h0 / d)))
    if rgb.shape[1] != wt or rgb.shape[0] != ht:
        rgb = np.asarray(Image.fromarray(rgb).resize((wt, ht), Image.Resampling.LANCZOS))
    return rgb, float(d)


def rasterize_tiles(pos, values, patch_size: float, downsample: float,
                    shape: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    r"""Paint tiles onto a thumbnail's pixel grid: the mean value of the tiles covering each pixel.

    Tile :math:`i` covers rows :math:`[\operatorname{round}(y_i/d), \operatorname{round}((y_i+s)/d))`
    and columns :math:`[\operatorname{round}(x_i/d), \operatorname{round}((x_i+s)/d))` (at least
    one pixel each way, clipped to the image); sums and counts are accumulated with 2-D
    difference arrays (:math:`O(N + HW)`, no loop over pixels).

    Args:
        pos: ``[N, 2]`` level-0 top-left corners.
        values: ``[N]`` values.
        patch_size (float): tile side :math:`s` in level-0 px.
        downsample (float): :math:`d`, level-0 px per thumbnail px.
        shape: ``(H, W)`` of the thumbnail.

    Returns:
        ``(mean, count)``: ``[H, W]`` float64 (NaN where no tile) and ``[H, W]`` int64.

    Shapes:
        - **pos:** ``[N, 2]``; **values:** ``[N]``; **outputs:** ``[H, W]``.
    """
    p = np.asarray(pos, dtype=np.float64)[:, :2]
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if p.shape[0] != v.size:
        raise ValueError(f"rasterize_tiles: 'pos' has {p.shape[0]} rows but 'values' has {v.size}")
    if not (float(patch_size) > 0 and float(downsample) > 0):
        raise ValueError("rasterize_tiles: 'patch_size' and 'downsample' must be > 0")
    H, W = int(shape[0]), int(shape[1])
    d, s = float(downsample), float(patch_size)
    x0 = np.round(p[:, 0] / d).astype(np.int64)
    y0 = np.round(p[:, 1] / d).astype(np.int64)
    x1 = np.maximum(np.round((p[:, 0] + s) / d).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.round((p[:, 1] + s) / d).astype(np.int64), y0 + 1)
    x0, x1 = np.clip(x0, 0, W), np.clip(x1, 0, W)
    y0, y1 = np.clip(y0, 0, H), np.clip(y1, 0, H)
    ok = (x1 > x0) & (y1 > y0)
    acc = np.zeros((2, H + 1, W + 1), dtype=np.float64)
    for ch, w in ((0, v), (1, np.ones_like(v))):
        a = acc[ch]
        np.add.at(a, (y0[ok], x0[ok]), w[ok])
        np.add.at(a, (y0[ok], x1[ok]), -w[ok])
        np.add.at(a, (y1[ok], x0[ok]), -w[ok])
        np.add.at(a, (y1[ok], x1[ok]), w[ok])
    acc = acc.cumsum(axis=1).cumsum(axis=2)[:, :H, :W]
    count = np.rint(acc[1]).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, acc[0] / np.maximum(count, 1), np.nan)
    return mean, count


def blend_heatmap(image, value_map, norm=None, cmap: str = DEFAULT_CMAP, alpha: float = 0.45) -> np.ndarray:
    r"""Blend a value map onto an RGB image: :math:`(1-\alpha)\,I + \alpha\,\text{cmap}(\text{norm}(v))`
    where :math:`v` is finite, :math:`I` elsewhere.

    Args:
        image: ``[H, W, 3]`` uint8.
        value_map: ``[H, W]`` float (NaN = no tile), e.g. from :func:`rasterize_tiles`.
        norm (optional): a matplotlib ``Normalize`` (default ``None``: the map's finite min–max).
        cmap (str): colour map (default :data:`~graphmil.viz.heatmap.DEFAULT_CMAP`).
        alpha (float): opacity of the colours, in ``[0, 1]`` (default ``0.45``).

    Returns:
        ``[H, W, 3]`` uint8.
    """
    import matplotlib.colors as mcolors
    from matplotlib import colormaps

    img = np.asarray(image)
    vm = np.asarray(value_map, dtype=np.float64)
    if img.ndim != 3 or img.shape[2] < 3 or img.shape[:2] != vm.shape:
        raise ValueError(f"blend_heatmap: 'image' [H, W, 3] and 'value_map' [H, W] must match, got "
                         f"{img.shape} and {vm.shape}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"blend_heatmap: 'alpha' must be in [0, 1], got {alpha!r}")
    if cmap not in colormaps:
        raise ValueError(f"blend_heatmap: 'cmap' {cmap!r} is not a matplotlib colour map")
    m = np.isfinite(vm)
    out = img[..., :3].astype(np.float64)
    if m.any():
        if norm is None:
            lo, hi = float(vm[m].min()), float(vm[m].max())
            norm = mcolors.Normalize(lo, hi if hi > lo else lo + 1.0)
        col = colormaps[cmap](np.clip(np.ma.filled(norm(vm[m]), 0.0), 0.0, 1.0))[:, :3] * 255.0
        out[m] = (1.0 - alpha) * out[m] + alpha * col
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass
class Overlay:
    """What :func:`overlay_heatmap` made.

    Attributes:
        path (str): the PNG written.
        image: ``[H, W, 3]`` uint8, the thumbnail with the heatmap blended in (the pixels of the
            PNG when ``decorate=False``).
        thumbnail: ``[H, W, 3]`` uint8, the slide thumbnail alone.
        values: ``[H, W]`` float64, the (clipped) display value of each thumbnail pixel (NaN where
            no tile).
        downsample (float): level-0 px per thumbnail px.
        norm: the matplotlib ``Normalize`` of the colours.
        colorbar_label (str): what the colours mean, with the scale.
    """

    path: str
    image: np.ndarray
    thumbnail: np.ndarray
    values: np.ndarray
    downsample: float
    norm: Any = None
    colorbar_label: str = ""


def _record_values(record, scale: str):
    from graphmil.viz.heatmap import display_values

    sid = record.slide_id
    if scale == "attention":
        if record.attention is None:
            raise ValueError(f"overlay_heatmap: scale='attention' needs attention weights; the model gives "
                             f"none for slide '{sid}'")
        a = record.attention if record.attention.ndim == 1 else record.attention.mean(axis=1)
        return display_values(a, "attention"), "attention"
    if record.instance_scores is None:
        raise ValueError(f"overlay_heatmap: the model gives no instance scores for slide '{sid}'")
    if scale == "probability":
        return display_values(record.score(), "logit"), "instance probability"
    return np.asarray(record.score(), dtype=np.float64), "instance score"


def overlay_heatmap(record, slide_path: PathLike, out_path: PathLike, width: int = 2000,
                    scale: Union[str, Sequence[float]] = "minmax", class_names: Optional[Sequence[str]] = None,
                    patch_size: Optional[float] = None, cmap: str = DEFAULT_CMAP, alpha: float = 0.45,
                    decorate: bool = True, title_prefix: Optional[str] = None, dpi: int = 120,
                    overwrite: bool = False, attention_range: Tuple[float, float] = ATTENTION_RANGE) -> Overlay:
    r"""Draw a :func:`graphmil.train.predict` record over its whole-slide image.

    Reads a thumbnail near ``width`` px (:func:`slide_thumbnail`), paints every tile at its real
    level-0 position and size scaled by the thumbnail's downsample (:func:`rasterize_tiles`;
    overlapping patches averaged) and blends the colours onto the tissue with opacity ``alpha``
    (:func:`blend_heatmap`). The colour scales are those of :func:`graphmil.viz.plot_heatmap`
    (``"minmax"`` / ``"rank"`` per slide; ``"attention"``, ``"probability"`` or ``(vmin, vmax)``
    absolute). ``decorate=True`` writes a figure with title (slide, label, probability), colour
    bar and a scale bar (µm when the slide gives its mpp); ``decorate=False`` writes the blended
    thumbnail pixels alone (same pixel frame as the thumbnail).

    Args:
        record: a ``BagPrediction`` with ``pos`` and instance scores (or attention).
        slide_path: the slide file.
        out_path: the PNG to write (must end in ``.png``).
        width (int): thumbnail width in px (default ``2000``).
        scale: colour scale (default ``"minmax"``).
        class_names (list of str, optional): class names for the title (default ``"0"``, ...).
        patch_size (float, optional): tile side in level-0 px (default: the record's
            ``patch_size_level0``).
        cmap (str): default :data:`~graphmil.viz.heatmap.DEFAULT_CMAP`.
        alpha (float): opacity of the colours (default ``0.45``).
        decorate (bool): title, colour bar and scale bar (default ``True``).
        title_prefix (str, optional): text before the slide id in the title.
        dpi (int): figure resolution (default ``120``; ``decorate`` only).
        overwrite (bool): replace an existing PNG (default ``False``).
        attention_range (tuple): range of the ``"attention"`` scale (default
            :data:`~graphmil.viz.heatmap.ATTENTION_RANGE`).

    Returns:
        :class:`Overlay`.

    Raises:
        ValueError: naming the slide or file: no positions, unknown tile size, no scores, a
            ``path`` not ending in ``.png`` or already existing, a slide that cannot be opened.

    Shapes:
        - **record.pos:** ``[n, 2]`` level-0 px; **Overlay.image:** ``[H, W, 3]`` with
          ``W = min(width, W_0)``.
    """
    from graphmil.io.geojson import tile_size
    from graphmil.viz.heatmap import colour_setup, resolve_scale, heatmap_title

    fn = "overlay_heatmap"
    out_path = str(out_path)
    if not out_path.lower().endswith(".png"):
        raise ValueError(f"{fn}: 'out_path' must end in .png, got '{out_path}'")
    if os.path.exists(out_path) and not overwrite:
        raise ValueError(f"{fn}: '{out_path}' already exists (pass overwrite=True to replace it)")
    if record.pos is None:
        raise ValueError(f"{fn}: slide '{record.slide_id}' has no positions ('pos')")
    sc = resolve_scale(scale, "minmax", fn)
    ps = tile_size(record, patch_size)
    raw, what = _record_values(record, sc if isinstance(sc, str) else "minmax")
    c, norm, cb_label, extend = colour_setup(raw, sc, attention_range, what, fn)
    slide = open_slide(slide_path)
    try:
        thumb, d = slide_thumbnail(slide_path, width, slide=slide)
        mpp = slide_mpp(slide)
    finally:
        slide.close()
    values, _ = rasterize_tiles(record.pos, c, ps, d, thumb.shape[:2])
    blended = blend_heatmap(thumb, values, norm=norm, cmap=cmap, alpha=alpha)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    if not decorate:
        from PIL import Image

        Image.fromarray(blended).save(out_path)
    else:
        _figure(blended, record, norm, cmap, cb_label, extend, d, mpp, class_names, title_prefix, out_path, dpi,
                heatmap_title)
    return Overlay(path=out_path, image=blended, thumbnail=thumb, values=values, downsample=d, norm=norm,
                   colorbar_label=cb_label)


def _figure(blended, record, norm, cmap, cb_label, extend, d, mpp, class_names, title_prefix, out_path, dpi,
            heatmap_title) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.font_manager import FontProperties
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    from graphmil.viz.heatmap import scale_bar_length

    names = list(class_names) if class_names is not None else [str(c) for c in range(len(record.probabilities))]
    p = record.probabilities
    pred = record.prediction()
    binary = len(p) == 2
    title = heatmap_title(
        f"{title_prefix} {record.slide_id}" if title_prefix else record.slide_id,
        label_name=names[record.label] if record.label is not None and record.label < len(names) else None,
        prob=float(p[1]) if binary else float(p[pred]),
        prob_name=(names[1] if binary else names[pred]) if len(names) > 1 else None,
        pred_name=names[pred] if pred < len(names) else str(pred))
    h, w = blended.shape[:2]
    fig_w = 7.0
    fig, ax = plt.subplots(figsize=(fig_w, max(2.5, fig_w * h / w * 0.9 + 0.6)))
    try:
        ax.imshow(blended, interpolation="antialiased")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=10)
        sm = ScalarMappable(norm=norm, cmap=colormaps[cmap])
        from mpl_toolkits.axes_grid1 import make_axes_locatable

        cax = make_axes_locatable(ax).append_axes("right", size="3.5%", pad=0.08)
        cb = fig.colorbar(sm, cax=cax, extend=extend)
        cb.set_label(cb_label)
        if mpp is not None:
            um = scale_bar_length(w * d * mpp)
            length_px, text = um / mpp / d, f"{um:g} µm"
        else:
            l0 = scale_bar_length(w * d)
            length_px, text = l0 / d, f"{int(l0):,} px (level 0)"
        bar = AnchoredSizeBar(ax.transData, length_px, text, loc="lower right", pad=0.4, borderpad=0.5, sep=3,
                              color="black", frameon=True, size_vertical=max(1.0, 0.01 * h),
                              fontproperties=FontProperties(size=8))
        bar.patch.set_facecolor("white")
        bar.patch.set_alpha(0.75)
        ax.add_artist(bar)
        fig.savefig(out_path, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
