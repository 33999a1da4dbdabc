"""Read one slide's patch features into a bag: CLAM ``h5_files``/``pt_files``, TRIDENT, graphmil.

Every reader returns a :class:`~torch_geometric.data.Data` built by :func:`graphmil.make_bag`
with ``x [N, D]`` float32 (float16 up-cast), ``pos [N, 2]`` int64 level-0 pixels exactly as stored,
``slide_id`` and the source attributes (see :data:`SOURCE_ATTRS`). Bad files raise
:class:`BagFileError` (a ``ValueError``) naming the file and the problem; an empty slide raises
:class:`EmptySlideError` (folder scans and datasets skip those with a warning).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch_geometric.data import Data

from graphmil.data.bag import make_bag

__all__ = [
    "read_bag",
    "BagFileError",
    "EmptySlideError",
    "SOURCE_ATTRS",
    "GRAPHMIL_FORMAT",
]

PathLike = Union[str, os.PathLike]

#: tag stored in graphmil's own bag files (a ``torch.save`` of a dict of tensors and scalars)
GRAPHMIL_FORMAT = "graphmil-bag"
GRAPHMIL_FORMAT_VERSION = 1

#: source attributes every reader sets (same keys for every format so bags batch together);
#: unknown numeric values are ``-1``, unknown strings ``""``.
SOURCE_ATTRS: Dict[str, type] = {
    "source_format": str,  # 'clam_h5' | 'clam_pt' | 'trident' | 'graphmil'
    "encoder": str,
    "patch_size": int,  # pixels at the patching level / target magnification
    "patch_level": int,  # CLAM pyramid level (-1 for TRIDENT / unknown)
    "patch_size_level0": int,  # level-0 footprint of a patch
    "step_level0": float,  # level-0 grid step (patch_size_level0 minus overlap), checked vs coords
    "level0_magnification": float,
    "target_magnification": float,
    "overlap": int,  # pixels at the target magnification
}


class BagFileError(ValueError):
    """A feature/coordinate file that graphmil cannot turn into a bag; the message names the file."""


class EmptySlideError(BagFileError):
    """A slide with zero patches (``coords`` ``(0, 2)``); scans and datasets skip it with a warning."""


# ----------------------------------------------------------------------------------------- helpers

def _fail(path: PathLike, problem: str, cls=BagFileError):
    raise cls(f"{os.fspath(path)}: {problem}")


def _scalar(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        if v.size == 1:
            return _scalar(v.reshape(-1)[0])
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _h5_attrs(ds) -> Dict[str, Any]:
    return {k: _scalar(v) for k, v in ds.attrs.items()}


def _slide_id_from(path: Path) -> str:
    stem = path.stem
    return stem[: -len("_patches")] if stem.endswith("_patches") else stem


def _encoder_from_dir(path: Path) -> str:
    name = path.parent.name
    return name[len("features_"):] if name.startswith("features_") else ""


_TRIDENT_DIR = re.compile(r"^(\d+(?:\.\d+)?)x_(\d+)px_(\d+)px_overlap$")


def _patch_file_candidates(path: Path, slide_id: str, patches_dir: Optional[PathLike]) -> List[Path]:
    """Where a slide's ``patches/<id>.h5`` (CLAM) or ``patches/<id>_patches.h5`` (TRIDENT) may be."""
    dirs: List[Path] = []
    if patches_dir is not None:
        dirs.append(Path(patches_dir))
    feat_dir = path.parent  # .../h5_files or .../features_<enc>
    for base in (feat_dir.parent, feat_dir.parent.parent, feat_dir):
        dirs.append(base / "patches")
    out: List[Path] = []
    for d in dirs:
        for name in (f"{slide_id}.h5", f"{slide_id}_patches.h5"):
            out.append(d / name)
    return out


def _find_patch_file(path: Path, slide_id: str, patches_dir: Optional[PathLike]) -> Optional[Path]:
    for cand in _patch_file_candidates(path, slide_id, patches_dir):
        if cand.is_file() and cand.resolve() != path.resolve():
            return cand
    return None


def _read_coords_file(pfile: Path) -> Tuple[np.ndarray, Dict[str, Any]]:
    import h5py

    try:
        with h5py.File(pfile, "r") as f:
            if "coords" not in f:
                _fail(pfile, f"missing dataset 'coords' (datasets present: {sorted(f.keys())})")
            ds = f["coords"]
            return ds[()], _h5_attrs(ds)
    except BagFileError:
        raise
    except Exception as e:  # noqa: BLE001 - h5py raises OSError / KeyError / RuntimeError
        _fail(pfile, f"unreadable coordinates file ({type(e).__name__}: {e})")


def _source_attrs(attrs: Dict[str, Any], source_format: str, encoder: str) -> Dict[str, Any]:
    """Normalise CLAM / TRIDENT attributes into :data:`SOURCE_ATTRS` (``-1`` = unknown)."""

    def num(key, cast, default=-1):
        v = attrs.get(key)
        if v is None or isinstance(v, (list, str)):
            return cast(default)
        try:
            v = cast(round(float(v))) if cast is int else cast(v)
        except (TypeError, ValueError):
            return cast(default)
        return v

    patch_size = num("patch_size", int)
    patch_level = num("patch_level", int)
    ps0 = num("patch_size_level0", int)
    if ps0 < 0 and patch_size > 0:
        ds = attrs.get("downsample")
        if isinstance(ds, list) and ds:
            ds = ds[0]
        if ds is not None and not isinstance(ds, str):
            ps0 = int(round(patch_size * float(ds)))
        elif patch_level == 0:
            ps0 = patch_size
    l0 = num("level0_magnification", float)
    tm = num("target_magnification", float)
    overlap = num("overlap", int)
    step = -1.0
    if ps0 > 0:
        if overlap > 0 and l0 > 0 and tm > 0:
            step = ps0 - overlap * l0 / tm
        elif overlap > 0 and patch_size > 0:
            step = ps0 - overlap * ps0 / patch_size
        else:
            step = float(ps0)
    return {
        "source_format": source_format,
        "encoder": encoder,
        "patch_size": patch_size,
        "patch_level": patch_level,
        "patch_size_level0": ps0,
        "step_level0": float(step),
        "level0_magnification": l0,
        "target_magnification": tm,
        "overlap": overlap,
    }


def _check_and_build(
    path: Path,
    features: np.ndarray,
    coords: np.ndarray,
    slide_id: str,
    attrs: Dict[str, Any],
) -> Data:
    """Validate features/coordinates, reconcile the step with the coordinates, build the bag."""
    from graphmil.transforms.graph import STEP_RTOL, infer_grid_step

    features = np.asarray(features)
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        if coords.size == 0:
            _fail(path, f"empty slide '{slide_id}' (no patches: coords shape {coords.shape})", EmptySlideError)
        _fail(path, f"'coords' must have shape (N, 2), got {coords.shape}")
    if coords.shape[0] == 0:
        _fail(path, f"empty slide '{slide_id}' (no patches: coords {coords.shape}, features {features.shape})", EmptySlideError)
    if features.ndim != 2:
        _fail(path, f"'features' must have shape (N, D), got {features.shape}")
    if features.shape[0] != coords.shape[0]:
        _fail(
            path,
            f"row-count mismatch: 'features' has {features.shape[0]} rows but 'coords' has {coords.shape[0]}",
        )
    if features.shape[1] == 0:
        _fail(path, f"'features' has zero columns (shape {features.shape})")
    if features.dtype.kind not in "fiu":
        _fail(path, f"'features' must be numeric, got dtype {features.dtype}")
    x = features.astype(np.float32, copy=False)
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=1))
        _fail(path, f"NaN/Inf features in {bad.size} row(s) (first rows: {bad[:5].tolist()})")
    if coords.dtype.kind == "f":
        if not np.isfinite(coords).all() or (coords != np.round(coords)).any():
            _fail(path, "'coords' must be integer level-0 pixels (found non-integer values)")
    elif coords.dtype.kind not in "iu":
        _fail(path, f"'coords' must be integers, got dtype {coords.dtype}")
    pos = coords.astype(np.int64, copy=False)
    lo = pos.min(axis=0)
    span = int(pos[:, 1].max() - lo[1]) + 1
    key = (pos[:, 0] - lo[0]) * span + (pos[:, 1] - lo[1])
    order = np.argsort(key, kind="stable")
    same = key[order][1:] == key[order][:-1]
    if same.any():
        first = int(np.flatnonzero(same)[0])
        i, j = sorted((int(order[first]), int(order[first + 1])))
        _fail(
            path,
            f"duplicate coordinates: {int(same.sum())} repeated row(s), e.g. rows [{i}, {j}] at {pos[i].tolist()}",
        )
    inferred = infer_grid_step(pos)
    step = attrs["step_level0"]
    if inferred is not None:
        if step > 0 and abs(inferred - step) > STEP_RTOL * step:
            warnings.warn(
                f"{os.fspath(path)}: grid step from the attributes ({step:g} level-0 px) disagrees with "
                f"the coordinate spacing ({inferred:g}); trusting the coordinates",
                UserWarning,
                stacklevel=3,
            )
        attrs = dict(attrs, step_level0=float(inferred))
        if attrs["patch_size_level0"] < 0:
            # CLAM without patches/ file: patches do not overlap by default, footprint = step
            attrs["patch_size_level0"] = int(round(inferred))
    try:
        return make_bag(torch.from_numpy(np.ascontiguousarray(x)), pos=torch.from_numpy(np.ascontiguousarray(pos)), slide_id=slide_id, **attrs)
    except ValueError as e:
        _fail(path, str(e))


# ------------------------------------------------------------------------------------------ readers

def _read_h5(path: Path, patches_dir: Optional[PathLike]) -> Data:
    import h5py

    try:
        f = h5py.File(path, "r")
    except Exception as e:  # noqa: BLE001
        _fail(path, f"unreadable file ({type(e).__name__}: {e})")
    try:
        keys = sorted(f.keys())
        if "features" not in f:
            if "coords" in f:
                _fail(path, "missing dataset 'features' (this looks like a coordinates-only patches file)")
            _fail(path, f"missing dataset 'features' (datasets present: {keys})")
        try:
            features = f["features"][()]  # one slice: h5 chunks are single rows
            coords_ds = f["coords"] if "coords" in f else None
            coords = None if coords_ds is None else coords_ds[()]
            cattrs = {} if coords_ds is None else _h5_attrs(coords_ds)
            fattrs = _h5_attrs(f)
        except Exception as e:  # noqa: BLE001
            _fail(path, f"unreadable dataset ({type(e).__name__}: {e})")
    finally:
        f.close()
    slide_id = _slide_id_from(path)
    encoder = _encoder_from_dir(path)
    attrs = {**fattrs, **cattrs}
    is_trident = "patch_size_level0" in attrs or path.parent.name.startswith("features_")
    if "patch_size_level0" not in attrs or coords is None:
        pfile = _find_patch_file(path, slide_id, patches_dir)
        if pfile is not None:
            pcoords, pattrs = _read_coords_file(pfile)
            attrs = {**pattrs, **attrs}
            if coords is None:
                coords = pcoords
    if coords is None:
        _fail(path, "missing dataset 'coords' and no patches/<slide_id>.h5 coordinates file found")
    if is_trident and not any(k in attrs for k in ("target_magnification", "patch_size_level0")):
        m = _TRIDENT_DIR.match(path.parent.parent.name)
        if m:
            attrs.setdefault("target_magnification", float(m.group(1)))
            attrs.setdefault("patch_size", int(m.group(2)))
            attrs.setdefault("overlap", int(m.group(3)))
    fmt = "trident" if is_trident else "clam_h5"
    return _check_and_build(path, features, coords, slide_id, _source_attrs(attrs, fmt, encoder))


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        _fail(path, f"unreadable file ({type(e).__name__}: {e})")


def _read_clam_pt(path: Path, obj, patches_dir: Optional[PathLike]) -> Data:
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(obj)
    feats = obj.detach().cpu()
    if feats.dtype == torch.bfloat16:
        feats = feats.float()
    features = feats.numpy()
    slide_id = _slide_id_from(path)
    coords, attrs = None, {}
    pfile = _find_patch_file(path, slide_id, patches_dir)
    if pfile is not None:
        coords, attrs = _read_coords_file(pfile)
    else:
        # CLAM writes h5_files/<id>.h5 (features + coords) next to pt_files/
        sib = path.parent.parent / "h5_files" / f"{slide_id}.h5"
        if sib.is_file():
            import h5py

            try:
                with h5py.File(sib, "r") as f:
                    if "coords" in f:
                        coords = f["coords"][()]
            except Exception:  # noqa: BLE001
                coords = None
    if coords is None:
        if features.ndim >= 1 and features.shape[0] == 0:
            _fail(path, f"empty slide '{slide_id}' (no patches: features {features.shape})", EmptySlideError)
        _fail(
            path,
            "missing coordinates: CLAM .pt files hold features only; no patches/"
            f"{slide_id}.h5 found (searched: {', '.join(sorted({os.fspath(c.parent) for c in _patch_file_candidates(path, slide_id, patches_dir)}))}); "
            "pass patches_dir=",
        )
    return _check_and_build(path, features, coords, slide_id, _source_attrs(attrs, "clam_pt", ""))


def _read_graphmil(path: Path, obj: dict) -> Data:
    if obj.get("version", 0) > GRAPHMIL_FORMAT_VERSION:
        _fail(path, f"graphmil bag format version {obj.get('version')} is newer than this graphmil ({GRAPHMIL_FORMAT_VERSION})")
    tensors = obj.get("tensors")
    attrs = obj.get("attrs", {})
    if not isinstance(tensors, dict) or "x" not in tensors:
        _fail(path, "missing dataset 'x' in graphmil bag file")
    data = Data()
    for k, v in tensors.items():
        data[k] = v
    for k, v in attrs.items():
        data[k] = v
    x = data.x
    if x.dim() == 2 and x.size(0) == 0:
        _fail(path, "empty slide (no instances)", EmptySlideError)
    if "pos" in data and data.pos is not None and data.pos.size(0) != x.size(0):
        _fail(path, f"row-count mismatch: 'x' has {x.size(0)} rows but 'pos' has {data.pos.size(0)}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten()
        _fail(path, f"NaN/Inf features in {bad.numel()} row(s) (first rows: {bad[:5].tolist()})")
    return data


def read_bag(path: PathLike, patches_dir: Optional[PathLike] = None) -> Data:
    r"""Read one slide's feature file into a bag.

    Supported files (detected from the file itself):

    - CLAM ``<feat_dir>/h5_files/<id>.h5``: ``features (N, D)``, ``coords (N, 2)``; the patch
      attributes come from ``patches/<id>.h5`` when found (``patches_dir``, else ``patches/`` next to
      or above the feature folder); ``patch_size_level0 = patch_size × downsample``.
    - CLAM ``<feat_dir>/pt_files/<id>.pt``: a ``(N, D)`` tensor; coordinates from ``patches/<id>.h5``
      (or ``h5_files/<id>.h5`` next to ``pt_files/``).
    - TRIDENT ``features_<enc>/<id>.h5``: ``features`` (float16 up-cast to float32) and ``coords``
      with attributes (``patch_size_level0``, ``level0_magnification``, ``target_magnification``,
      ``overlap``, ...); ``encoder`` from the folder name.
    - graphmil's own ``.pt`` bag file (:func:`graphmil.io.write_bag`): returned as written.

    The grid step is

    .. math::
        s = \text{patch\_size\_level0} - \text{overlap}\cdot
            \frac{\text{level0\_magnification}}{\text{target\_magnification}},

    checked against the most common nearest-neighbour distance of the coordinates; if they differ
    by more than 1 % the coordinates win (``step_level0`` is set from them) and a warning is emitted.
    Each dataset is read with one slice (h5 chunks are single rows).

    Args:
        path: the feature file.
        patches_dir (optional): folder holding ``<id>.h5`` / ``<id>_patches.h5`` coordinate files
            (default ``None``: searched next to the feature folder).

    Returns:
        ``Data`` with ``x [N, D]`` float32, ``pos [N, 2]`` int64 (level-0 px, untouched),
        ``slide_id`` and the :data:`SOURCE_ATTRS` (``-1`` / ``""`` when unknown).

    Raises:
        EmptySlideError: the slide has no patches.
        BagFileError: (a ``ValueError``) naming the file: unreadable file, missing dataset,
            row-count mismatch between features and coords, NaN/Inf features, duplicate
            coordinates, malformed shapes.

    Shapes:
        - **output:** ``x [N, D]``, ``pos [N, 2]``
    """
    path = Path(path)
    if not path.exists():
        _fail(path, "no such file")
    if path.is_dir():
        _fail(path, "is a directory, expected a feature file (use graphmil.io.scan for folders)")
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return _read_h5(path, patches_dir)
    if suffix in (".pt", ".pth"):
        obj = _torch_load(path)
        if isinstance(obj, dict) and obj.get("format") == GRAPHMIL_FORMAT:
            return _read_graphmil(path, obj)
        if isinstance(obj, (torch.Tensor, np.ndarray)):
            return _read_clam_pt(path, obj, patches_dir)
        _fail(path, f"unrecognised .pt content ({type(obj).__name__}); expected a CLAM feature tensor or a graphmil bag")
    _fail(path, f"unsupported file type '{path.suffix}' (expected .h5 or .pt)")
