"""Write realistic CLAM / TRIDENT feature folders (with a labels table) for tests, examples and demos.

The folders follow the on-disk layouts of CLAM and TRIDENT exactly (see ``docs/data.md``): CLAM
starts a separate patch lattice at each tissue contour (different origins), TRIDENT stores the
patch attributes on ``coords`` and a 40× scan patched at 20× has ``patch_size_level0 = 2 ×
patch_size``. Features are Gaussian noise, shifted in a contiguous "tumour" disc on positive slides.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np

__all__ = ["write_synthetic_folder", "SyntheticFolder", "synthetic_lattice"]

PathLike = Union[str, os.PathLike]
LAYOUTS = ("trident", "clam_h5", "clam_pt")


@dataclass
class SyntheticFolder:
    """What :func:`write_synthetic_folder` wrote (paths, ids and the true lattice geometry)."""

    root: Path
    layout: str
    feature_dir: Path  #: the folder holding the per-slide feature files
    patches_dir: Path  #: the folder holding the per-slide coordinate files
    labels_path: Path
    slide_ids: List[str]  #: non-empty slides
    empty_slide_ids: List[str]
    labels: Dict[str, object]  #: slide_id -> label as written in the table
    case_ids: Dict[str, str]
    patch_size: int
    patch_size_level0: int
    step_level0: int  #: true level-0 grid step (patch_size_level0 minus the level-0 overlap)
    num_features: int
    encoder: str
    contour_origins: Dict[str, List[Tuple[int, int]]] = field(default_factory=dict)

    def feature_file(self, slide_id: str) -> Path:
        """Path of the feature file of ``slide_id``."""
        ext = ".pt" if self.layout == "clam_pt" else ".h5"
        return self.feature_dir / f"{slide_id}{ext}"


def synthetic_lattice(
    rng: np.random.Generator,
    step: int,
    num_contours: int = 2,
    radius: Tuple[float, float] = (2.5, 5.0),
    start: Tuple[int, int] = (1000, 1000),
) -> Tuple[np.ndarray, List[Tuple[int, int]]]:
    r"""Patch corners of ``num_contours`` elliptic tissue pieces, each on its own lattice origin.

    Contour :math:`c` has origin :math:`o_c` (not a multiple of ``step`` apart from the others) and
    holds :math:`o_c + s\,(i, j)` for lattice cells inside an ellipse; contours are placed side by
    side about 1.5 steps apart, so some cross-contour pairs fall inside the 8-neighbour radius at
    non-lattice distances (as on real CLAM output).

    Args:
        rng: numpy generator.
        step (int): level-0 grid step.
        num_contours (int): tissue pieces (default ``2``).
        radius: range of the ellipse semi-axes in lattice cells (default ``(2.5, 5.0)``).
        start: level-0 corner of the first contour's bounding box (default ``(1000, 1000)``).

    Returns:
        ``(coords [N, 2] int64, origins)``.
    """
    pieces, origins = [], []
    x0 = start[0]
    for _ in range(num_contours):
        a, b = rng.uniform(*radius, size=2)
        ox = int(x0 + rng.integers(1, step))
        oy = int(start[1] + rng.integers(1, step))
        ii, jj = np.meshgrid(np.arange(int(2 * a) + 1), np.arange(int(2 * b) + 1), indexing="xy")
        inside = ((ii - a) / a) ** 2 + ((jj - b) / b) ** 2 <= 1.0
        cells = np.stack([ii[inside], jj[inside]], axis=1)
        order = np.lexsort((cells[:, 0], cells[:, 1]))  # scan order: rows (y), then x
        cells = cells[order]
        pieces.append(np.array([ox, oy]) + step * cells)
        origins.append((ox, oy))
        x0 = int(pieces[-1][:, 0].max() + 1.2 * step)
    return np.concatenate(pieces).astype(np.int64), origins


def _features(rng, coords, step, d, positive, dtype):
    x = rng.standard_normal((coords.shape[0], d)).astype(np.float32)
    if positive and coords.shape[0]:
        centre = coords[rng.integers(coords.shape[0])]
        blob = np.linalg.norm(coords - centre, axis=1) <= 2.2 * step
        x[blob, : min(4, d)] += 1.5
    return x.astype(dtype)


def write_synthetic_folder(
    root: PathLike,
    layout: str = "trident",
    num_slides: int = 4,
    magnification: int = 40,
    target_magnification: int = 20,
    patch_size: int = 256,
    overlap: int = 0,
    num_features: int = 32,
    num_contours: int = 2,
    dtype: str = "float32",
    empty_slide: bool = False,
    encoder: str = "uni_v1",
    seed: int = 0,
) -> SyntheticFolder:
    r"""Write a CLAM or TRIDENT feature folder with ``num_slides`` slides and a labels table.

    Layouts written under ``root``:

    - ``'trident'``: ``<T>x_<ps>px_<ovl>px_overlap/patches/<id>_patches.h5`` and
      ``.../features_<encoder>/<id>.h5`` (attributes ``patch_size``, ``patch_size_level0``,
      ``level0_magnification``, ``target_magnification``, ``overlap``, ``level0_width``,
      ``level0_height``, ``name`` on ``coords`` in both), labels ``labels.tsv`` with
      ``case_id, slide_id, label, fold_0``.
    - ``'clam_h5'`` / ``'clam_pt'``: ``patches/<id>.h5`` (``coords`` with attributes
      ``patch_size``, ``patch_level``, ``downsample``, ``level_dim``, ``name``) and
      ``features/h5_files/<id>.h5`` (``features``, ``coords`` int32, no attributes) or
      ``features/pt_files/<id>.pt`` (a float32 tensor); labels ``labels.csv`` with
      ``case_id, slide_id, label`` (``'normal'`` / ``'tumor'``).

    Level-0 geometry: ``patch_size_level0 = patch_size × magnification / target_magnification``
    and step :math:`= \text{patch\_size\_level0} - \text{overlap}\cdot\text{magnification}/
    \text{target\_magnification}`; each slide has ``num_contours`` tissue pieces on different
    lattice origins (:func:`synthetic_lattice`). Odd slides are positive (label 1 / ``'tumor'``).

    Args:
        root: output folder (created).
        layout (str): ``'trident'`` (default), ``'clam_h5'`` or ``'clam_pt'``.
        num_slides (int): non-empty slides (default ``4``).
        magnification (int): level-0 magnification of the scan (default ``40``).
        target_magnification (int): patching magnification (default ``20``).
        patch_size (int): patch size at the target magnification (default ``256``).
        overlap (int): overlap in pixels at the target magnification (default ``0``).
        num_features (int): feature width ``D`` (default ``32``).
        num_contours (int): tissue pieces per slide (default ``2``).
        dtype (str): ``'float32'`` (default) or ``'float16'`` features.
        empty_slide (bool): also write a slide ``'slide_empty'`` with zero patches (default ``False``).
        encoder (str): TRIDENT encoder name (default ``'uni_v1'``).
        seed (int): random seed (default ``0``).

    Returns:
        :class:`SyntheticFolder` describing what was written.
    """
    import h5py

    if layout not in LAYOUTS:
        raise ValueError(f"write_synthetic_folder: 'layout' must be one of {LAYOUTS}, got {layout!r}")
    if (patch_size * magnification) % target_magnification:
        raise ValueError("write_synthetic_folder: patch_size × magnification / target_magnification must be an integer")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"write_synthetic_folder: 'dtype' must be 'float32' or 'float16', got {dtype!r}")
    ratio = magnification / target_magnification
    ps0 = int(round(patch_size * ratio))
    step = int(round(ps0 - overlap * ratio))
    if not 0 < step <= ps0:
        raise ValueError(f"write_synthetic_folder: 'overlap' {overlap} leaves no positive step")
    root = Path(root)
    rng = np.random.default_rng(seed)
    ids = [f"slide_{i:03d}" for i in range(num_slides)]
    all_ids = ids + (["slide_empty"] if empty_slide else [])
    labels: Dict[str, object] = {}
    cases: Dict[str, str] = {}
    origins: Dict[str, List[Tuple[int, int]]] = {}

    if layout == "trident":
        job = root / f"{target_magnification}x_{patch_size}px_{overlap}px_overlap"
        patches_dir, feature_dir = job / "patches", job / f"features_{encoder}"
    else:
        patches_dir = root / "patches"
        feature_dir = root / "features" / ("h5_files" if layout == "clam_h5" else "pt_files")
    patches_dir.mkdir(parents=True, exist_ok=True)
    feature_dir.mkdir(parents=True, exist_ok=True)

    for i, sid in enumerate(all_ids):
        positive = i % 2 == 1
        if sid == "slide_empty":
            coords = np.zeros((0, 2), dtype=np.int64)
            origins[sid] = []
        else:
            coords, origins[sid] = synthetic_lattice(rng, step, num_contours)
        x = _features(rng, coords, step, num_features, positive, dtype)
        width = int(coords[:, 0].max() + ps0 + 1000) if coords.size else 10000
        height = int(coords[:, 1].max() + ps0 + 1000) if coords.size else 10000
        cases[sid] = f"case_{i // 2:03d}"
        if layout == "trident":
            attrs = {
                "patch_size": patch_size,
                "patch_size_level0": ps0,
                "level0_magnification": magnification,
                "target_magnification": target_magnification,
                "overlap": overlap,
                "level0_width": width,
                "level0_height": height,
                "name": sid,
                "savetodir": str(patches_dir),
            }
            with h5py.File(patches_dir / f"{sid}_patches.h5", "w") as f:
                ds = f.create_dataset("coords", data=coords.astype(np.int64))
                ds.attrs.update(attrs)
            with h5py.File(feature_dir / f"{sid}.h5", "w") as f:
                f.create_dataset("features", data=x if coords.size else np.zeros((0,), dtype=dtype))
                ds = f.create_dataset("coords", data=coords.astype(np.int64))
                ds.attrs.update(attrs)
            labels[sid] = int(positive)
        else:
            level = 0 if ratio == 1 else 1
            attrs = {
                "patch_size": patch_size,
                "patch_level": level,
                "downsample": np.array([ratio, ratio], dtype=np.float64),
                "downsampled_level_dim": np.array([width // ratio, height // ratio], dtype=np.int64),
                "level_dim": np.array([width, height], dtype=np.int64),
                "name": sid,
                "save_path": str(patches_dir),
            }
            with h5py.File(patches_dir / f"{sid}.h5", "w") as f:
                ds = f.create_dataset("coords", data=coords.astype(np.int64))
                ds.attrs.update(attrs)
            if layout == "clam_h5":
                with h5py.File(feature_dir / f"{sid}.h5", "w") as f:
                    f.create_dataset("features", data=x.reshape(-1, num_features))
                    f.create_dataset("coords", data=coords.astype(np.int32))
            else:
                import torch

                torch.save(torch.from_numpy(x.reshape(-1, num_features)), feature_dir / f"{sid}.pt")
            labels[sid] = "tumor" if positive else "normal"

    if layout == "trident":
        labels_path = root / "labels.tsv"
        with open(labels_path, "w", newline="") as fh:
            w = csv.writer(fh, delimiter="\t")
            w.writerow(["case_id", "slide_id", "label", "fold_0"])
            for i, sid in enumerate(all_ids):
                w.writerow([cases[sid], sid, labels[sid], "test" if i % 4 == 3 else "train"])
    else:
        labels_path = root / "labels.csv"
        with open(labels_path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["case_id", "slide_id", "label"])
            for sid in all_ids:
                w.writerow([cases[sid], sid, labels[sid]])

    return SyntheticFolder(
        root=root,
        layout=layout,
        feature_dir=feature_dir,
        patches_dir=patches_dir,
        labels_path=labels_path,
        slide_ids=ids,
        empty_slide_ids=["slide_empty"] if empty_slide else [],
        labels=labels,
        case_ids=cases,
        patch_size=patch_size,
        patch_size_level0=ps0,
        step_level0=step,
        num_features=num_features,
        encoder=encoder if layout == "trident" else "",
        contour_origins=origins,
    )
