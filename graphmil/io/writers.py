"""Write bags in graphmil's own format and export instance scores as h5 aligned with ``coords``."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data

from graphmil.io.readers import GRAPHMIL_FORMAT, GRAPHMIL_FORMAT_VERSION, SOURCE_ATTRS

__all__ = ["write_bag", "write_scores"]

PathLike = Union[str, os.PathLike]

_SCALARS = (int, float, str, bool)
_TRIDENT_DIR = re.compile(r"^\d+(?:\.\d+)?x_\d+px_\d+px_overlap$")


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bag(path: PathLike, data: Data) -> Path:
    r"""Write a bag in graphmil's own format, read back by :func:`graphmil.io.read_bag`.

    The file is a ``torch.save`` of a plain dict (loadable with ``torch.load(weights_only=True)``)::

        {"format": "graphmil-bag", "version": 1,
         "tensors": {"x": ..., "pos": ..., "edge_index": ..., ...},   # every tensor attribute
         "attrs":   {"slide_id": ..., "step_level0": ..., ...}}       # int/float/str/bool attributes

    Tensors are stored contiguous on CPU with their dtype; the write is atomic (temporary file +
    rename), so a crashed run never leaves a half-written bag.

    Args:
        path: target file (``.pt`` recommended); parent folders are created.
        data: the bag.

    Returns:
        The path written.

    Raises:
        ValueError: naming the attribute, when one is neither a tensor nor an int/float/str/bool.
    """
    path = Path(path)
    if not isinstance(data, Data):
        raise ValueError(f"write_bag: 'data' must be a torch_geometric Data, got {type(data).__name__}")
    if data.get("x") is None:
        raise ValueError("write_bag: 'data' has no 'x'")
    tensors: Dict[str, Tensor] = {}
    attrs: Dict[str, Any] = {}
    for key in data.keys():
        value = data[key]
        if isinstance(value, Tensor):
            tensors[key] = value.detach().cpu().contiguous()
        elif isinstance(value, np.ndarray):
            tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
        elif isinstance(value, _SCALARS) or value is None:
            attrs[key] = value
        elif isinstance(value, np.generic):
            attrs[key] = value.item()
        else:
            raise ValueError(f"write_bag: attribute '{key}' of type {type(value).__name__} cannot be stored")
    _atomic_save({"format": GRAPHMIL_FORMAT, "version": GRAPHMIL_FORMAT_VERSION, "tensors": tensors, "attrs": attrs}, path)
    return path


def inside_source_folder(target: Path, source_dir: Optional[PathLike]) -> Optional[str]:
    """Return why ``target`` looks like a user's source feature folder, else None."""
    target_dir = target.resolve().parent
    if source_dir is not None:
        src = Path(source_dir).resolve()
        if target_dir == src or src in target_dir.parents:
            return f"it is inside the source folder {src}"
    for d in (target_dir, *target_dir.parents):
        name = d.name
        if name in ("h5_files", "pt_files", "patches") or name.startswith("features_") or _TRIDENT_DIR.match(name):
            return f"'{d}' is a CLAM/TRIDENT source folder"
    return None


def write_scores(
    path: PathLike,
    data: Data,
    *,
    overwrite: bool = False,
    source_dir: Optional[PathLike] = None,
    **scores: Any,
) -> Path:
    r"""Export per-instance scores (attention, probabilities, ...) aligned with the bag's coordinates.

    The h5 file holds ``coords (N, 2)`` int64 (the bag's ``pos``, level-0 px), with the source
    attributes (:data:`graphmil.io.SOURCE_ATTRS` present on the bag, plus ``slide_id``) as attributes
    of ``coords`` (the TRIDENT convention) and of the file, and one dataset per score
    (``float32``; ``[N]`` or ``[N, K]``), so CLAM/TRIDENT heatmap code and QuPath-style viewers can
    read it. Row ``i`` of every score belongs to row ``i`` of ``coords``.

    Args:
        path: the h5 file to write.
        data: the bag (must have ``pos [N, 2]``).
        overwrite (bool): replace an existing file (default ``False``: refuse).
        source_dir (optional): the feature folder the bag came from; refuse to write inside it.
            Independently of it, folders named ``h5_files``, ``pt_files``, ``patches``,
            ``features_<enc>`` or ``<mag>x_<ps>px_<ovl>px_overlap`` (and their sub-folders) are refused.
        **scores: name → tensor/array with ``N`` rows.

    Returns:
        The path written.

    Raises:
        ValueError: no scores, a score with the wrong number of rows or non-finite values, a
            reserved name (``coords``), missing ``pos``.
        FileExistsError: the file exists and ``overwrite`` is false.
        ValueError: the target is inside a source feature folder.
    """
    import h5py

    path = Path(path)
    if not scores:
        raise ValueError("write_scores: give at least one score, e.g. write_scores(path, bag, attention=a)")
    pos = data.get("pos") if isinstance(data, Data) else None
    if pos is None:
        raise ValueError("write_scores: 'data' has no 'pos' (coordinates [N, 2])")
    coords = pos.detach().cpu().numpy() if isinstance(pos, Tensor) else np.asarray(pos)
    n = coords.shape[0]
    arrays: Dict[str, np.ndarray] = {}
    for name, value in scores.items():
        if name == "coords":
            raise ValueError("write_scores: 'coords' is reserved for the coordinates")
        arr = value.detach().cpu().float().numpy() if isinstance(value, Tensor) else np.asarray(value, dtype=np.float32)
        if arr.ndim == 0 or arr.shape[0] != n or arr.ndim > 2:
            raise ValueError(f"write_scores: score '{name}' must be [N] or [N, K] with N = {n}, got shape {tuple(arr.shape)}")
        if not np.isfinite(arr).all():
            raise ValueError(f"write_scores: score '{name}' has NaN or Inf values")
        arrays[name] = arr.astype(np.float32, copy=False)
    why = inside_source_folder(path, source_dir)
    if why is not None:
        raise ValueError(f"write_scores: refusing to write {path}: {why} (graphmil never writes into source folders)")
    if path.exists() and not overwrite:
        raise FileExistsError(f"write_scores: {path} exists; pass overwrite=True to replace it")
    attrs: Dict[str, Any] = {}
    for key in (*SOURCE_ATTRS, "slide_id"):
        if key in data and isinstance(data[key], (int, float, str, bool, np.generic)):
            attrs[key] = data[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        ds = f.create_dataset("coords", data=coords.astype(np.int64) if coords.dtype.kind in "iu" else coords)
        for k, v in attrs.items():
            ds.attrs[k] = v
            f.attrs[k] = v
        for name, arr in arrays.items():
            f.create_dataset(name, data=arr)
    os.replace(tmp, path)
    return path
