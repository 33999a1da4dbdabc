"""Detect the layout of a feature folder (CLAM h5 / CLAM pt / TRIDENT / graphmil) and list its slides."""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch_geometric.data import Data

from graphmil.io.readers import GRAPHMIL_FORMAT, BagFileError, read_bag

__all__ = ["scan", "detect_layout", "FolderInfo", "SlideInfo", "LAYOUTS"]

PathLike = Union[str, os.PathLike]

#: layouts :func:`scan` recognises
LAYOUTS = ("clam_h5", "clam_pt", "trident", "graphmil")
_TRIDENT_DIR = re.compile(r"^(\d+(?:\.\d+)?)x_(\d+)px_(\d+)px_overlap$")


@dataclass
class SlideInfo:
    """One slide of a feature folder."""

    slide_id: str
    path: Path
    num_patches: int
    num_features: int
    dtype: str = ""

    def __repr__(self) -> str:
        return f"SlideInfo({self.slide_id!r}, num_patches={self.num_patches}, num_features={self.num_features})"


@dataclass
class FolderInfo:
    """Result of :func:`scan`: the layout, where things are, and the (non-empty) slides."""

    root: Path
    layout: str
    feature_dir: Path
    patches_dir: Optional[Path]
    encoder: str
    slides: List[SlideInfo] = field(default_factory=list)
    empty: List[SlideInfo] = field(default_factory=list)  #: empty slides (skipped with a warning)
    errors: List[str] = field(default_factory=list)  #: unreadable files (``on_error='warn'``)

    @property
    def slide_ids(self) -> List[str]:
        return [s.slide_id for s in self.slides]

    @property
    def num_patches(self) -> int:
        return sum(s.num_patches for s in self.slides)

    def __len__(self) -> int:
        return len(self.slides)

    def __iter__(self) -> Iterator[SlideInfo]:
        return iter(self.slides)

    def __getitem__(self, key: Union[int, str]) -> SlideInfo:
        if isinstance(key, str):
            for s in self.slides:
                if s.slide_id == key:
                    return s
            raise KeyError(f"no slide {key!r} in {self.feature_dir}")
        return self.slides[key]

    def read(self, key: Union[int, str]) -> Data:
        """Read one slide with :func:`graphmil.io.read_bag`."""
        return read_bag(self[key].path, patches_dir=self.patches_dir)

    def summary(self) -> str:
        """A human-readable summary (what ``graphmil info`` prints)."""
        dims = sorted({s.num_features for s in self.slides})
        counts = [s.num_patches for s in self.slides]
        lines = [
            f"layout:       {self.layout}",
            f"features:     {self.feature_dir}",
            f"patches:      {self.patches_dir if self.patches_dir else '-'}",
            f"encoder:      {self.encoder or '-'}",
            f"slides:       {len(self.slides)} (+{len(self.empty)} empty, skipped)",
            f"patches:      {sum(counts)} total"
            + (f", {min(counts)}..{max(counts)} per slide" if counts else ""),
            f"feature dim:  {', '.join(map(str, dims)) or '-'}",
        ]
        if self.errors:
            lines.append(f"unreadable:   {len(self.errors)} file(s)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"FolderInfo(layout={self.layout!r}, feature_dir='{self.feature_dir}', "
            f"num_slides={len(self.slides)}, num_empty={len(self.empty)})"
        )


def _feature_files(d: Path, suffixes: Tuple[str, ...]) -> List[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."))


def _is_graphmil_file(p: Path) -> bool:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001
        return False
    return isinstance(obj, dict) and obj.get("format") == GRAPHMIL_FORMAT


def _clam_patches_dir(feature_dir: Path) -> Optional[Path]:
    for base in (feature_dir.parent, feature_dir.parent.parent):
        if (base / "patches").is_dir():
            return base / "patches"
    return None


def _trident_candidates(root: Path) -> List[Path]:
    """``features_<enc>`` folders under ``root`` (root itself, a ``<mag>x_..._overlap`` folder, or a job dir)."""
    if root.name.startswith("features_"):
        return [root]
    out: List[Path] = []
    dirs = [root] if _TRIDENT_DIR.match(root.name) else [d for d in sorted(root.iterdir()) if d.is_dir() and _TRIDENT_DIR.match(d.name)]
    for d in dirs:
        out.extend(sorted(c for c in d.iterdir() if c.is_dir() and c.name.startswith("features_")))
    return out


def detect_layout(root: PathLike, encoder: Optional[str] = None) -> Tuple[str, Path, Optional[Path], str]:
    """Detect which feature-folder layout ``root`` is.

    Recognised (``root`` may be the top folder or the feature folder itself):

    - ``'clam_h5'``: ``root/h5_files/`` (or ``root/*/h5_files/``, or ``root`` named ``h5_files``);
      preferred over ``pt_files`` when both exist (the h5 files carry coordinates).
    - ``'clam_pt'``: ``root/pt_files/`` (same rules).
    - ``'trident'``: ``root/<mag>x_<ps>px_<ovl>px_overlap/features_<enc>/`` (or ``root`` being the
      ``..._overlap`` folder or the ``features_<enc>`` folder).
    - ``'graphmil'``: ``root`` holds ``.pt`` bag files written by :func:`graphmil.io.write_bag`.

    Args:
        root: the folder.
        encoder (str, optional): TRIDENT encoder to pick when several ``features_<enc>`` exist.

    Returns:
        ``(layout, feature_dir, patches_dir or None, encoder)``.

    Raises:
        ValueError: naming ``root``: not a folder, no known layout, or several TRIDENT feature
            folders and no (matching) ``encoder``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    # CLAM
    if root.name in ("h5_files", "pt_files"):
        layout = "clam_h5" if root.name == "h5_files" else "clam_pt"
        return layout, root, _clam_patches_dir(root), ""
    for base in [root] + [d for d in sorted(root.iterdir()) if d.is_dir()]:
        for name, layout in (("h5_files", "clam_h5"), ("pt_files", "clam_pt")):
            if (base / name).is_dir():
                return layout, base / name, _clam_patches_dir(base / name), ""
    # TRIDENT
    cands = _trident_candidates(root)
    if cands:
        if encoder is not None:
            cands = [c for c in cands if c.name == f"features_{encoder}"]
            if not cands:
                raise ValueError(f"{root}: no TRIDENT folder features_{encoder}/ found")
        if len(cands) > 1:
            listing = ", ".join(str(c.relative_to(root)) for c in cands)
            raise ValueError(
                f"{root}: several TRIDENT feature folders ({listing}); pass encoder= or point root at one of them"
            )
        fdir = cands[0]
        pdir = fdir.parent / "patches"
        return "trident", fdir, pdir if pdir.is_dir() else None, fdir.name[len("features_"):]
    # graphmil
    pts = _feature_files(root, (".pt",))
    if pts and _is_graphmil_file(pts[0]):
        return "graphmil", root, None, ""
    raise ValueError(
        f"{root}: no CLAM (h5_files/, pt_files/), TRIDENT (<mag>x_<ps>px_<ovl>px_overlap/features_<enc>/) "
        "or graphmil (.pt bag files) layout found"
    )


def _shape_of(path: Path, layout: str) -> Tuple[int, int, str]:
    """(num_patches, num_features, dtype) without reading the data."""
    if path.suffix.lower() == ".h5":
        import h5py

        try:
            with h5py.File(path, "r") as f:
                if "features" not in f:
                    raise BagFileError(f"{path}: missing dataset 'features' (datasets present: {sorted(f.keys())})")
                shape, dtype = f["features"].shape, str(f["features"].dtype)
                if "coords" in f and f["coords"].shape[:1] != shape[:1] and len(shape) == 2:
                    raise BagFileError(
                        f"{path}: row-count mismatch: 'features' has {shape[0]} rows but 'coords' has {f['coords'].shape[0]}"
                    )
        except BagFileError:
            raise
        except Exception as e:  # noqa: BLE001
            raise BagFileError(f"{path}: unreadable file ({type(e).__name__}: {e})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001
            raise BagFileError(f"{path}: unreadable file ({type(e).__name__}: {e})") from None
        if isinstance(obj, dict) and obj.get("format") == GRAPHMIL_FORMAT:
            obj = obj.get("tensors", {}).get("x")
        if not isinstance(obj, (torch.Tensor, np.ndarray)):
            raise BagFileError(f"{path}: unrecognised .pt content ({type(obj).__name__})")
        shape, dtype = tuple(obj.shape), str(obj.dtype)
    n = int(shape[0]) if len(shape) else 0
    d = int(shape[1]) if len(shape) == 2 else 0
    return n, d, dtype


def scan(
    root: PathLike,
    encoder: Optional[str] = None,
    patches_dir: Optional[PathLike] = None,
    on_error: str = "raise",
) -> FolderInfo:
    """Detect the layout of ``root`` and list its slides with their patch counts.

    Only shapes are read (no feature data). Empty slides (zero patches) are listed in
    ``FolderInfo.empty`` and skipped with a warning.

    Args:
        root: a CLAM / TRIDENT / graphmil folder (see :func:`detect_layout`).
        encoder (str, optional): TRIDENT encoder to pick (default ``None``: the only one).
        patches_dir (optional): override the coordinates folder (default: detected).
        on_error (str): ``'raise'`` (default) raises :class:`BagFileError` for an unreadable or
            inconsistent file; ``'warn'`` records it in ``FolderInfo.errors`` and skips it.

    Returns:
        :class:`FolderInfo`.

    Example:
        >>> import tempfile
        >>> from graphmil.io import write_synthetic_folder
        >>> folder = write_synthetic_folder(tempfile.mkdtemp(), layout="trident", num_slides=2)
        >>> info = scan(folder.root)
        >>> info.layout, len(info)
        ('trident', 2)
    """
    if on_error not in ("raise", "warn"):
        raise ValueError(f"scan: 'on_error' must be 'raise' or 'warn', got {on_error!r}")
    layout, fdir, pdir, enc = detect_layout(root, encoder)
    if patches_dir is not None:
        pdir = Path(patches_dir)
    info = FolderInfo(root=Path(root), layout=layout, feature_dir=fdir, patches_dir=pdir, encoder=enc)
    suffixes = (".pt",) if layout in ("clam_pt", "graphmil") else (".h5",)
    for path in _feature_files(fdir, suffixes):
        sid = path.stem
        try:
            n, d, dtype = _shape_of(path, layout)
        except BagFileError as e:
            if on_error == "raise":
                raise
            warnings.warn(f"skipping {e}", UserWarning, stacklevel=2)
            info.errors.append(str(e))
            continue
        slide = SlideInfo(sid, path, n, d, dtype)
        if n == 0:
            warnings.warn(f"{path}: empty slide '{sid}' (no patches), skipped", UserWarning, stacklevel=2)
            info.empty.append(slide)
        else:
            info.slides.append(slide)
    return info
