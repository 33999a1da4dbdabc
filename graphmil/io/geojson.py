r"""Instance scores as QuPath-ready GeoJSON (and CSV / h5): one square polygon per tile, in
level-0 pixels, and merged "predicted region" annotations.

Layout (what QuPath ≥ 0.4 writes with *File → Export objects as GeoJSON* and reads back with
*File → Import objects*, or by dropping the file on the viewer)::

    {"type": "FeatureCollection",
     "features": [
       {"type": "Feature",
        "id": "<uuid>",                                   # QuPath's object id (a UUID)
        "geometry": {"type": "Polygon",
                     "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]},
        "properties": {
          "objectType": "tile",                           # or "detection"; regions: "annotation"
          "classification": {"name": "tumor", "color": [200, 0, 0]},   # only tiles above a threshold
          "measurements": {"score": 1.3, "attention": 0.012, "attention_x_n": 2.4,
                           "slide_prob_tumor": 0.91, "slide_prediction": 1, "tile_index": 17},
          "metadata": {"slide_id": "...", "model": "abmil", "slide_prediction": "tumor"}}},
       ...],
     "properties": {...}}                                 # slide-level summary (not read by QuPath)

Coordinates are **level-0 pixels** (x to the right, y down), the frame of CLAM / TRIDENT
``coords`` and of QuPath's full-resolution image: tile ``i`` covers
:math:`[x_i, x_i + s) \times [y_i, y_i + s)` with ``pos[i] = (x_i, y_i)`` its top-left corner and
:math:`s` = ``patch_size_level0``. Overlapping patches (step < :math:`s`) give overlapping
squares. Every ring is closed (first point = last point) and exterior rings are
counter-clockwise in the RFC 7946 sense (positive shoelace area
:math:`\tfrac12\sum_k x_k y_{k+1} - x_{k+1} y_k > 0` on the raw coordinates), holes clockwise.

``measurements`` is a dict of name → number (QuPath ≥ 0.4; 0.3 wrote a list of
``{"name", "value"}``): ``score`` (the instance score, head mean) and ``score_<h>`` per head,
``attention`` (softmaxed weight, head mean) and ``attention_<h>`` per head, ``attention_x_n``
(attention × bag size, ``1`` = uniform; comparable across slides), ``instance_label`` when known,
``tile_index`` (the row of ``coords``), and the slide's ``slide_prob_<class>`` and
``slide_prediction`` (class index). QuPath shows them in the measurement table and can colour
the tiles by any of them (*Measure → Show measurement maps*). NaN is never written (JSON has
none).
"""

from __future__ import annotations

import csv
import json
import os
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

__all__ = ["OBJECT_TYPES", "TILE_VALUES", "REGION_COLOR", "tile_size", "tile_values", "select_tiles",
           "tile_measurements", "tiles_geojson", "merged_regions", "region_features", "write_geojson",
           "write_tiles_csv", "export_prediction"]

PathLike = Union[str, os.PathLike]

OBJECT_TYPES = ("tile", "detection", "annotation")
"""QuPath object types a feature may carry: ``"tile"`` (a tile object: light, no child objects),
``"detection"`` (a detection, same look in the viewer) or ``"annotation"`` (editable, for the
merged regions)."""

TILE_VALUES = ("score", "attention", "attention_x_n")
"""Per-tile values :func:`select_tiles` and :func:`merged_regions` rank / threshold: the instance
score (head mean), the attention weight (head mean), attention × N (``1`` = uniform)."""

REGION_COLOR = (200, 0, 0)
"""RGB colour of the classification of tiles above the threshold and of merged regions."""

_NAMESPACE = uuid.UUID("6f1c3b8e-3f55-4d7a-9d43-1c0f3b0a9e11")


def _sid(record) -> str:
    return str(getattr(record, "slide_id", "?"))


def tile_size(record, patch_size: Optional[float] = None) -> float:
    """The level-0 side of a record's tiles: ``patch_size`` when given, else the record's
    ``patch_size_level0`` (from the CLAM / TRIDENT attributes).

    Args:
        record: a :class:`graphmil.train.BagPrediction`.
        patch_size (float, optional): override (default ``None``: ``record.meta["patch_size_level0"]``).

    Returns:
        The tile side in level-0 pixels (``> 0``).

    Raises:
        ValueError: naming the slide, when neither gives a positive size.
    """
    if patch_size is not None:
        ps = float(patch_size)
        if not (ps > 0 and np.isfinite(ps)):
            raise ValueError(f"slide '{_sid(record)}': the tile size must be > 0, got {patch_size!r}")
        return ps
    v = (getattr(record, "meta", None) or {}).get("patch_size_level0")
    try:
        ps = float(v) if v is not None else float("nan")
    except (TypeError, ValueError):
        ps = float("nan")
    if not (ps > 0 and np.isfinite(ps)):
        raise ValueError(f"slide '{_sid(record)}': the tile size is unknown (no positive "
                         f"'patch_size_level0' attribute, got {v!r}); give it (--patch-size PX, "
                         "patch_size=) in level-0 pixels")
    return ps


def _positions(record) -> np.ndarray:
    if record.pos is None:
        raise ValueError(f"slide '{_sid(record)}' has no positions ('pos'): nothing to place on the slide")
    p = np.asarray(record.pos)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"slide '{_sid(record)}': 'pos' must be [N, 2], got shape {p.shape}")
    if not np.isfinite(p[:, :2]).all():
        raise ValueError(f"slide '{_sid(record)}': 'pos' holds non-finite coordinates")
    return p[:, :2]


def _mean(a: Optional[np.ndarray]) -> Optional[np.ndarray]:
    if a is None:
        return None
    a = np.asarray(a, dtype=np.float64)
    return a if a.ndim == 1 else a.mean(axis=1)


def tile_values(record, by: str = "score") -> np.ndarray:
    r"""One value per tile of a :func:`graphmil.train.predict` record.

    ``"score"``: the instance score (head mean for ``[n, H]``); ``"attention"``: the softmaxed
    attention weight (head mean); ``"attention_x_n"``: :math:`a_i \cdot N` (``1`` = uniform
    attention, :func:`graphmil.viz.display_values`).

    Args:
        record: a ``BagPrediction``.
        by (str): one of :data:`TILE_VALUES` (default ``"score"``).

    Returns:
        ``[n]`` float64.

    Raises:
        ValueError: naming the slide, for an unknown ``by`` or a model that gives no such value.
    """
    if by not in TILE_VALUES:
        raise ValueError(f"'by' must be one of {', '.join(TILE_VALUES)}, got {by!r}")
    if by == "score":
        v = _mean(record.instance_scores)
        if v is None:
            raise ValueError(f"slide '{_sid(record)}': the model gives no instance scores")
        return v
    a = _mean(record.attention)
    if a is None:
        raise ValueError(f"slide '{_sid(record)}': the model gives no attention weights (by={by!r}); use by='score'")
    if by == "attention":
        return a
    from graphmil.viz.heatmap import display_values

    return display_values(a, "attention")


def select_tiles(record, by: str = "score", top_k: Optional[int] = None,
                 threshold: Optional[float] = None) -> np.ndarray:
    r"""Indices of the tiles to keep: :math:`v_i \ge` ``threshold`` (when given), then the
    ``top_k`` largest :math:`v_i` of those (when given), with :math:`v` = :func:`tile_values`.

    Args:
        record: a ``BagPrediction``.
        by (str): the value compared (default ``"score"``, see :data:`TILE_VALUES`).
        top_k (int, optional): keep at most this many, highest first (default ``None``: all).
        threshold (float, optional): keep values ``>= threshold`` (default ``None``: all).

    Returns:
        ``[k]`` int64 indices into ``pos``: in ``pos`` order without ``top_k``, by decreasing
        value with it (ties by index).

    Raises:
        ValueError: ``top_k < 1``, a non-finite threshold, or from :func:`tile_values`.
    """
    v = tile_values(record, by)
    idx = np.arange(v.size)
    if threshold is not None:
        t = float(threshold)
        if not np.isfinite(t):
            raise ValueError(f"'threshold' must be a finite number, got {threshold!r}")
        idx = idx[v[idx] >= t]
    if top_k is not None:
        if int(top_k) < 1:
            raise ValueError(f"'top_k' must be >= 1, got {top_k!r}")
        order = np.lexsort((idx, -v[idx]))  # value descending, index ascending
        idx = idx[order][: int(top_k)]
    return idx.astype(np.int64)


def _num(v) -> Optional[float]:
    f = float(v)
    return f if np.isfinite(f) else None


def _slide_measurements(record, class_names: Sequence[str]) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for c, p in enumerate(np.asarray(record.probabilities, dtype=np.float64)):
        name = class_names[c] if c < len(class_names) else str(c)
        if _num(p) is not None:
            out[f"slide_prob_{name}"] = float(p)
    out["slide_prediction"] = int(record.prediction())
    if record.label is not None:
        out["slide_label"] = int(record.label)
    return out


def tile_measurements(record, class_names: Optional[Sequence[str]] = None) -> List[Dict[str, float]]:
    """The QuPath ``measurements`` of every tile of a record (name → number, NaN dropped).

    Keys: ``tile_index``; ``score`` (+ ``score_<h>`` for several heads), ``attention``
    (+ ``attention_<h>``) and ``attention_x_n`` when the model gives attention; ``instance_label``
    when known; the slide's ``slide_prob_<class>``, ``slide_prediction`` (and ``slide_label``).

    Args:
        record: a ``BagPrediction``.
        class_names (list of str, optional): class names (default ``"0"``, ``"1"``, ...).

    Returns:
        ``[n]`` dicts, one per row of ``pos``.
    """
    n = record.num_instances
    names = list(class_names) if class_names is not None else [str(c) for c in range(len(record.probabilities))]
    cols: Dict[str, np.ndarray] = {}
    for key, arr in (("score", record.instance_scores), ("attention", record.attention)):
        if arr is None:
            continue
        a = np.asarray(arr, dtype=np.float64)
        cols[key] = a if a.ndim == 1 else a.mean(axis=1)
        if a.ndim == 2 and a.shape[1] > 1:
            for h in range(a.shape[1]):
                cols[f"{key}_{h}"] = a[:, h]
    if record.attention is not None:
        try:
            cols["attention_x_n"] = tile_values(record, "attention_x_n")
        except ValueError:  # attention of a subset (not summing to 1): leave it out
            pass
    if record.y_inst is not None:
        cols["instance_label"] = np.asarray(record.y_inst, dtype=np.float64)
    slide = _slide_measurements(record, names)
    rows = []
    for i in range(n):
        m: Dict[str, float] = {"tile_index": i}
        for k, col in cols.items():
            v = _num(col[i])
            if v is not None:
                m[k] = v
        m.update(slide)
        rows.append(m)
    return rows


def _ring(x0: float, y0: float, x1: float, y1: float) -> List[List[float]]:
    # counter-clockwise on the raw coordinates (positive shoelace area), closed
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _coord(v: float):
    return int(v) if float(v).is_integer() else float(v)


def _positive_class(record, class_names: Sequence[str]) -> str:
    if len(record.probabilities) == 2:
        return class_names[1] if len(class_names) > 1 else "1"
    pred = int(record.prediction())
    return class_names[pred] if pred < len(class_names) else str(pred)


def _feature_id(*parts) -> str:
    return str(uuid.uuid5(_NAMESPACE, "/".join(str(p) for p in parts)))


def tiles_geojson(record, class_names: Optional[Sequence[str]] = None, model_name: Optional[str] = None,
                  patch_size: Optional[float] = None, object_type: str = "tile", by: str = "score",
                  top_k: Optional[int] = None, threshold: Optional[float] = None, merge: bool = False,
                  region_class: Optional[str] = None, region_color: Sequence[int] = REGION_COLOR) -> Dict[str, Any]:
    r"""A record's tiles as a QuPath-ready GeoJSON ``FeatureCollection`` (the layout in the module
    docstring), in level-0 pixels.

    One ``Polygon`` feature per kept tile (:func:`select_tiles`): the square
    :math:`[x_i, x_i + s] \times [y_i, y_i + s]`, ``properties.objectType = object_type``,
    ``properties.measurements`` from :func:`tile_measurements`. With a ``threshold`` the kept
    tiles are classified ``region_class`` (QuPath draws them in its colour). ``merge=True`` adds
    the :func:`merged_regions` of the tiles at or above ``threshold`` as ``"annotation"`` features
    (:func:`region_features`). The collection's own ``properties`` (ignored by QuPath) hold the
    slide id, model, class names, probabilities, prediction and tile size.

    Args:
        record: a :class:`graphmil.train.BagPrediction` with ``pos``.
        class_names (list of str, optional): the classes' original names (default ``"0"``, ...).
        model_name (str, optional): written into every feature's ``metadata`` (default ``None``).
        patch_size (float, optional): tile side in level-0 px (default: the record's
            ``patch_size_level0``, :func:`tile_size`).
        object_type (str): ``"tile"`` (default) or ``"detection"``.
        by (str): the value ``top_k`` / ``threshold`` / ``merge`` use (default ``"score"``).
        top_k (int, optional): keep the ``top_k`` highest tiles only (default ``None``).
        threshold (float, optional): keep tiles with value ``>= threshold`` (default ``None``).
        merge (bool): add merged region annotations (needs ``threshold``; default ``False``).
        region_class (str, optional): class of thresholded tiles and regions (default: the second
            class name for two classes, else the predicted class).
        region_color: RGB of that class (default :data:`REGION_COLOR`).

    Returns:
        The ``FeatureCollection`` as a dict (``json.dump`` it, or :func:`write_geojson`).

    Raises:
        ValueError: naming the slide: no ``pos``, unknown tile size, no such value, ``merge``
            without ``threshold``, an unknown ``object_type``.

    Shapes:
        - **record.pos:** ``[n, 2]`` level-0 top-left corners; output: ``k`` tile features
          (``k = n`` without filters) plus the region features.
    """
    if object_type not in ("tile", "detection"):
        raise ValueError(f"'object_type' must be 'tile' or 'detection' (regions are annotations), got {object_type!r}")
    if merge and threshold is None:
        raise ValueError(f"slide '{_sid(record)}': merging tiles into regions needs a threshold")
    pos = _positions(record)
    ps = tile_size(record, patch_size)
    names = list(class_names) if class_names is not None else [str(c) for c in range(len(record.probabilities))]
    keep = select_tiles(record, by, top_k, threshold)
    meas = tile_measurements(record, names)
    pred = int(record.prediction())
    pred_name = names[pred] if pred < len(names) else str(pred)
    cls_name = region_class if region_class is not None else _positive_class(record, names)
    colour = [int(c) for c in region_color]
    metadata = {"slide_id": _sid(record), "slide_prediction": pred_name}
    if model_name:
        metadata["model"] = str(model_name)
    features = []
    for i in keep.tolist():
        x0, y0 = float(pos[i, 0]), float(pos[i, 1])
        props: Dict[str, Any] = {"objectType": object_type, "measurements": meas[i], "metadata": metadata}
        if threshold is not None:
            props["classification"] = {"name": cls_name, "color": colour}
        features.append({
            "type": "Feature",
            "id": _feature_id(_sid(record), model_name or "", "tile", i),
            "geometry": {"type": "Polygon",
                         "coordinates": [[[_coord(a), _coord(b)] for a, b in _ring(x0, y0, x0 + ps, y0 + ps)]]},
            "properties": props,
        })
    if merge:
        geom = merged_regions(record, threshold, by=by, patch_size=ps)
        features += region_features(geom, name=f"predicted {cls_name} region ({by} >= {float(threshold):g})",
                                    classification=cls_name, color=colour,
                                    measurements=_region_measurements(record, geom, pos, ps, by, threshold, names),
                                    metadata=metadata, id_prefix=(_sid(record), model_name or ""))
    p = np.asarray(record.probabilities, dtype=np.float64)
    return {
        "type": "FeatureCollection",
        "features": features,
        "properties": {
            "slide_id": _sid(record), "case_id": str(getattr(record, "case_id", _sid(record))),
            "model": model_name, "class_names": names,
            "probabilities": {names[c] if c < len(names) else str(c): float(p[c]) for c in range(p.size)},
            "prediction": pred_name,
            "label": names[record.label] if record.label is not None and record.label < len(names) else None,
            "patch_size_level0": _coord(ps), "num_instances": int(pos.shape[0]), "num_tiles": len(keep),
            "by": by, "top_k": top_k, "threshold": threshold,
            "coordinates": "level-0 pixels, x right, y down; tile = [x, x + s] x [y, y + s] with (x, y) "
                           "the top-left corner of the patch",
            "generator": "graphmil",
        },
    }


def _shapely():
    try:
        import shapely  # noqa: F401
        from shapely.geometry import box
        from shapely.ops import unary_union
    except ImportError:  # pragma: no cover - shapely is in the slides/test extras
        raise ImportError("merging tiles into regions needs shapely >= 2: pip install 'graphmil[slides]'") from None
    return box, unary_union


def merged_regions(record, threshold: float, by: str = "score", patch_size: Optional[float] = None):
    r"""The union of the tiles at or above ``threshold`` as a shapely geometry, in level-0 px.

    .. math::
        R = \bigcup_{i:\ v_i \ge t} [x_i, x_i + s] \times [y_i, y_i + s]

    Edge-adjacent (and overlapping) tiles fuse into one polygon, holes are kept, tiles that touch
    only at a corner stay separate polygons; collinear vertices are removed (the area is exact).

    Args:
        record: a ``BagPrediction`` with ``pos``.
        threshold (float): the value :math:`t` (inclusive).
        by (str): the value compared (default ``"score"``, see :data:`TILE_VALUES`).
        patch_size (float, optional): tile side (default: the record's ``patch_size_level0``).

    Returns:
        A shapely ``Polygon`` / ``MultiPolygon`` (empty when no tile passes).

    Raises:
        ValueError: as :func:`tiles_geojson`.
    """
    box, unary_union = _shapely()
    from shapely.geometry import MultiPolygon, Polygon

    pos = _positions(record)
    ps = tile_size(record, patch_size)
    idx = select_tiles(record, by, threshold=threshold)
    if idx.size == 0:
        return Polygon()
    geom = unary_union([box(float(x), float(y), float(x) + ps, float(y) + ps) for x, y in pos[idx]])
    geom = geom.simplify(0.0, preserve_topology=True)
    if not isinstance(geom, (Polygon, MultiPolygon)):  # pragma: no cover - union of boxes is polygonal
        geom = MultiPolygon([g for g in getattr(geom, "geoms", []) if isinstance(g, Polygon)])
    return geom


def _region_measurements(record, geom, pos, ps, by, threshold, names) -> List[Dict[str, float]]:
    """Per polygon: the number of tiles above the threshold in it, their mean value, the slide's."""
    import shapely

    v = tile_values(record, by)
    idx = select_tiles(record, by, threshold=threshold)
    cx, cy = pos[idx, 0] + ps / 2.0, pos[idx, 1] + ps / 2.0
    slide = _slide_measurements(record, names)
    out = []
    for poly in getattr(geom, "geoms", [geom]):
        inside = shapely.contains_xy(poly, cx, cy)
        m = {"num_tiles": int(inside.sum())}
        if inside.any():
            m[f"mean_{by}"] = float(v[idx][inside].mean())
        out.append({**m, **slide})
    return out


def _polygon_coords(poly) -> List[List[List[float]]]:
    from shapely.geometry.polygon import orient

    p = orient(poly, sign=1.0)  # exterior counter-clockwise, holes clockwise
    rings = [p.exterior, *p.interiors]
    return [[[_coord(x), _coord(y)] for x, y in r.coords] for r in rings]


def region_features(geometry, name: str = "predicted region", classification: Optional[str] = None,
                    color: Sequence[int] = REGION_COLOR, measurements: Optional[Dict[str, float]] = None,
                    metadata: Optional[Dict[str, str]] = None, id_prefix: Sequence = ()) -> List[Dict[str, Any]]:
    """QuPath ``annotation`` features of a (multi)polygon: one feature per connected polygon,
    exterior counter-clockwise, holes clockwise, each with the measurement ``area_px`` (level-0
    px²) plus the given ``measurements``.

    Args:
        geometry: a shapely ``Polygon`` or ``MultiPolygon`` (e.g. :func:`merged_regions`).
        name (str): the annotations' name (default ``"predicted region"``; ``" k/K"`` appended
            when there are several).
        classification (str, optional): class name (default ``None``: unclassified).
        color: RGB of the class (default :data:`REGION_COLOR`).
        measurements (dict or list of dict, optional): more numbers for every region, or one dict
            per polygon of ``geometry.geoms`` (default ``None``).
        metadata (dict, optional): string metadata (default ``None``).
        id_prefix: parts of the deterministic feature ids (default ``()``).

    Returns:
        A list of GeoJSON features (empty for an empty geometry).
    """
    if geometry is None or geometry.is_empty:
        return []
    polys = list(getattr(geometry, "geoms", [geometry]))
    extra = list(measurements) if isinstance(measurements, (list, tuple)) else [measurements] * len(polys)
    if len(extra) != len(polys):
        raise ValueError(f"region_features: {len(extra)} measurement dicts for {len(polys)} polygons")
    out = []
    for k, poly in enumerate(polys):
        props: Dict[str, Any] = {"objectType": "annotation", "isLocked": False,
                                 "name": name if len(polys) == 1 else f"{name} {k + 1}/{len(polys)}",
                                 "measurements": {"area_px": float(poly.area), **(extra[k] or {})}}
        if classification is not None:
            props["classification"] = {"name": str(classification), "color": [int(c) for c in color]}
        if metadata:
            props["metadata"] = dict(metadata)
        out.append({"type": "Feature", "id": _feature_id(*id_prefix, "region", k),
                    "geometry": {"type": "Polygon", "coordinates": _polygon_coords(poly)},
                    "properties": props})
    return out


def _target(path: PathLike, source_dir, overwrite: bool, fn: str) -> Path:
    from graphmil.io.writers import inside_source_folder

    path = Path(path)
    why = inside_source_folder(path, source_dir)
    if why is not None:
        raise ValueError(f"{fn}: refusing to write {path}: {why} (graphmil never writes into source folders)")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{fn}: {path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_geojson(path: PathLike, collection: Dict[str, Any], overwrite: bool = False,
                  source_dir: Optional[PathLike] = None, indent: Optional[int] = None) -> Path:
    """Write a GeoJSON ``FeatureCollection`` (e.g. :func:`tiles_geojson`) atomically.

    Args:
        path: the ``.geojson`` file.
        collection (dict): the collection.
        overwrite (bool): replace an existing file (default ``False``: refuse).
        source_dir (optional): the feature folder the bags came from; refuse to write inside it
            (and inside any CLAM / TRIDENT folder, as :func:`graphmil.io.write_scores`).
        indent (int, optional): JSON indent (default ``None``: compact).

    Returns:
        The path written.

    Raises:
        ValueError: not a FeatureCollection, a target inside a source folder.
        FileExistsError: the file exists and ``overwrite`` is false.
    """
    if not isinstance(collection, dict) or collection.get("type") != "FeatureCollection":
        raise ValueError(f"write_geojson: {path}: 'collection' must be a GeoJSON FeatureCollection dict")
    path = _target(path, source_dir, overwrite, "write_geojson")
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(collection, f, indent=indent, allow_nan=False,
                  separators=None if indent is not None else (",", ":"))
    os.replace(tmp, path)
    return path


def write_tiles_csv(path: PathLike, record, class_names: Optional[Sequence[str]] = None,
                    patch_size: Optional[float] = None, keep: Optional[Sequence[int]] = None,
                    overwrite: bool = False, source_dir: Optional[PathLike] = None) -> Path:
    """Write a record's tiles as CSV: ``x, y, patch_size_level0`` (level-0 px, top-left) then the
    :func:`tile_measurements` columns, one row per kept tile.

    Args:
        path: the ``.csv`` file.
        record: a ``BagPrediction`` with ``pos``.
        class_names (list of str, optional): class names (default ``"0"``, ...).
        patch_size (float, optional): tile side (default: ``patch_size_level0``; the column is
            empty when unknown).
        keep (optional): the rows to write (default ``None``: all, in ``pos`` order).
        overwrite (bool): default ``False``.
        source_dir (optional): refuse to write inside it (default ``None``).

    Returns:
        The path written.
    """
    pos = _positions(record)
    try:
        ps: Any = _coord(tile_size(record, patch_size))
    except ValueError:
        ps = ""
    meas = tile_measurements(record, class_names)
    idx = range(pos.shape[0]) if keep is None else [int(i) for i in keep]
    keys = ["x", "y", "patch_size_level0"]
    for m in meas:
        keys += [k for k in m if k not in keys]
    path = _target(path, source_dir, overwrite, "write_tiles_csv")
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for i in idx:
            w.writerow({"x": _coord(pos[i, 0]), "y": _coord(pos[i, 1]), "patch_size_level0": ps, **meas[i]})
    os.replace(tmp, path)
    return path


def export_prediction(record, out_dir: PathLike, format: str = "geojson",
                      class_names: Optional[Sequence[str]] = None, model_name: Optional[str] = None,
                      patch_size: Optional[float] = None, object_type: str = "tile", by: str = "score",
                      top_k: Optional[int] = None, threshold: Optional[float] = None, merge: bool = False,
                      source_dir: Optional[PathLike] = None, overwrite: bool = False) -> Path:
    """Write one record as ``<out_dir>/<slide_id>.geojson`` (:func:`tiles_geojson`), ``.csv``
    (:func:`write_tiles_csv`) or ``.h5`` (:func:`graphmil.io.write_scores`: ``coords`` + ``score``
    (+ ``attention``) datasets), with the same tile selection (``top_k``, ``threshold``).

    Args:
        record: a ``BagPrediction``.
        out_dir: the folder (created).
        format (str): ``"geojson"`` (default), ``"csv"`` or ``"h5"``.
        class_names, model_name, patch_size, object_type, by, top_k, threshold, merge: as in
            :func:`tiles_geojson` (``merge`` for GeoJSON only).
        source_dir (optional): refuse to write inside it (default ``None``).
        overwrite (bool): default ``False``.

    Returns:
        The path written.

    Raises:
        ValueError: naming the slide (see :func:`tiles_geojson`); ``merge`` with another format.
    """
    out_dir = Path(out_dir)
    sid = _sid(record)
    if format == "geojson":
        fc = tiles_geojson(record, class_names, model_name, patch_size, object_type, by, top_k, threshold, merge)
        return write_geojson(out_dir / f"{sid}.geojson", fc, overwrite=overwrite, source_dir=source_dir)
    if merge:
        raise ValueError("merging tiles into regions writes GeoJSON only (format='geojson')")
    keep = None if top_k is None and threshold is None else select_tiles(record, by, top_k, threshold)
    if format == "csv":
        return write_tiles_csv(out_dir / f"{sid}.csv", record, class_names, patch_size, keep,
                               overwrite=overwrite, source_dir=source_dir)
    if format == "h5":
        from graphmil.io.writers import write_scores

        _positions(record)
        if record.instance_scores is None:
            raise ValueError(f"slide '{sid}': the model gives no instance scores to export")
        sel = slice(None) if keep is None else np.asarray(keep, dtype=np.int64)
        data = record.to_data()
        if keep is not None:
            data.pos = data.pos[sel]
        if patch_size is not None:
            data.patch_size_level0 = float(patch_size)
        scores = {"score": np.asarray(record.instance_scores)[sel]}
        if record.attention is not None:
            scores["attention"] = np.asarray(record.attention)[sel]
        if keep is not None:
            scores["tile_index"] = np.asarray(keep, dtype=np.float32)
        return write_scores(out_dir / f"{sid}.h5", data, overwrite=overwrite, source_dir=source_dir, **scores)
    raise ValueError(f"'format' must be 'geojson', 'csv' or 'h5', got {format!r}")
