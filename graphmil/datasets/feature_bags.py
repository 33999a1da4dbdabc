"""A PyG dataset over a CLAM / TRIDENT patch-feature folder and a labels table."""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch_geometric.data import Data, Dataset

from graphmil.io.folders import FolderInfo, scan
from graphmil.io.readers import read_bag
from graphmil.io.writers import write_bag
from graphmil.transforms.graph import GridGraph

__all__ = ["FeatureBagDataset", "read_labels", "default_cache_root", "normalize_slide_id"]

PathLike = Union[str, os.PathLike]
CACHE_VERSION = 1
_WSI_EXT = re.compile(r"\.(svs|tif|tiff|ndpi|mrxs|scn|czi|bif|vms|vmu|svslide|isyntax|dcm|h5|pt)$", re.IGNORECASE)
_MISSING = {"", "nan", "na", "n/a", "none", "null"}


def default_cache_root() -> Path:
    """``$GRAPHMIL_CACHE``, else ``$XDG_CACHE_HOME/graphmil``, else ``~/.cache/graphmil``."""
    if os.environ.get("GRAPHMIL_CACHE"):
        return Path(os.environ["GRAPHMIL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "graphmil"


def normalize_slide_id(slide_id: str) -> str:
    """A slide id as graphmil matches it: stripped, without a WSI / feature-file extension
    (``TCGA-01.svs`` → ``TCGA-01``)."""
    return _WSI_EXT.sub("", str(slide_id).strip())


_norm_id = normalize_slide_id


def read_labels(labels: Any, label_column: str = "label") -> Dict[str, Tuple[str, Optional[str]]]:
    """Read a labels table into ``{slide_id: (case_id, label or None)}``.

    Accepts a CLAM CSV (``case_id, slide_id, label``), a TRIDENT-style TSV (``case_id``,
    ``slide_id``, task columns, ``fold_<i>`` columns; pick the task with ``label_column``), a
    mapping ``{slide_id: label}`` or a pandas ``DataFrame``. Slide ids lose a WSI extension
    (``.svs``, ``.tif``, ...); ``case_id`` defaults to the slide id; an empty / ``nan`` cell is a
    missing label (``None``).

    Raises:
        ValueError: naming the file: missing ``slide_id`` / label column, conflicting duplicate rows.
    """
    rows: List[Dict[str, Any]]
    name = "labels"
    if isinstance(labels, Mapping):
        rows = [{"slide_id": k, label_column: v} for k, v in labels.items()]
    elif hasattr(labels, "to_dict") and hasattr(labels, "columns"):  # pandas DataFrame
        rows = labels.to_dict(orient="records")
        cols = list(labels.columns)
        if "slide_id" not in cols or label_column not in cols:
            raise ValueError(f"labels DataFrame needs columns 'slide_id' and '{label_column}', has {cols}")
    else:
        path = Path(labels)
        name = str(path)
        if not path.is_file():
            raise ValueError(f"{path}: labels file not found")
        with open(path, newline="") as fh:
            text = fh.read()
        if path.suffix.lower() == ".tsv":
            delim = "\t"
        elif path.suffix.lower() == ".csv":
            delim = ","
        else:
            first = text.splitlines()[0] if text else ""
            delim = max(",\t;", key=first.count)
        reader = csv.DictReader(text.splitlines(), delimiter=delim)
        cols = reader.fieldnames or []
        if "slide_id" not in cols or label_column not in cols:
            raise ValueError(f"{path}: labels table needs columns 'slide_id' and '{label_column}', has {cols}")
        rows = list(reader)
    out: Dict[str, Tuple[str, Optional[str]]] = {}
    for row in rows:
        sid = _norm_id(row["slide_id"])
        raw = row.get(label_column)
        lab = None if raw is None or str(raw).strip().lower() in _MISSING else str(raw).strip()
        case = row.get("case_id")
        case = sid if case is None or str(case).strip().lower() in _MISSING else str(case).strip()
        if sid in out and out[sid] != (case, lab):
            raise ValueError(f"{name}: slide '{sid}' listed twice with different case/label {out[sid]} vs {(case, lab)}")
        out[sid] = (case, lab)
    return out


def _file_signature(path: Path, extra: Optional[Path] = None) -> str:
    h = hashlib.sha1()
    for p in (path, extra):
        if p is not None and p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:12]


def _resolve_graph(graph: Any) -> Optional[Callable]:
    if graph is None or graph == "none":
        return None
    if isinstance(graph, str):
        m = re.fullmatch(r"grid([48])", graph)
        if not m:
            raise ValueError(f"FeatureBagDataset: 'graph' must be 'grid8', 'grid4', None or a transform, got {graph!r}")
        return GridGraph(connectivity=int(m.group(1)))
    if callable(graph):
        return graph
    raise ValueError(f"FeatureBagDataset: 'graph' must be 'grid8', 'grid4', None or a transform, got {graph!r}")


class FeatureBagDataset(Dataset):
    r"""Slides of a CLAM / TRIDENT feature folder as PyG bags with a spatial graph and a bag label.

    The folder is scanned with :func:`graphmil.io.scan` (layout detected, empty slides skipped with
    a warning), each slide is read once with :func:`graphmil.io.read_bag`, gets its graph
    (``graph``, default 8-neighbour :class:`~graphmil.transforms.GridGraph`) and ``pre_transform``,
    and is written as one graphmil bag file per slide into a **separate cache folder**
    ``<cache_dir>/<key>/`` (never into ``root``). The key hashes the feature folder, its layout and
    encoder and the ``repr`` of ``graph`` and ``pre_transform``, so changing graph parameters builds
    a new cache; each file name carries a signature of the source file (size, mtime), so a changed
    slide is re-processed. Labels are kept in memory (not in the cache) and attached in :meth:`get`:
    ``y`` ``[1]`` (class index; string labels through :attr:`label_map`), ``case_id`` (for
    patient-grouped splits). Nothing else is held in memory, so the dataset scales to any number of
    slides.

    Args:
        root: the CLAM / TRIDENT folder (see :func:`graphmil.io.detect_layout`).
        labels: labels table (CLAM CSV ``case_id,slide_id,label``, TRIDENT-style TSV), a mapping
            ``{slide_id: label}`` or a pandas DataFrame (:func:`read_labels`).
        cache_dir (optional): cache root (default ``None``: ``$GRAPHMIL_CACHE`` or
            ``~/.cache/graphmil``, under ``feature_bags/``); must not be inside ``root``.
        graph: ``'grid8'`` (default), ``'grid4'``, ``None`` or any transform building ``edge_index``.
        label_column (str): label column of the table (default ``'label'``).
        label_map (dict, optional): label string → class index (default ``None``: integer labels as
            is, string labels mapped in sorted order).
        encoder (str, optional): TRIDENT encoder when several exist (default ``None``).
        patches_dir (optional): coordinates folder override (default ``None``: detected).
        strict (bool): raise on slides without labels / labels without slides (default ``True``);
            ``False`` warns and keeps the slides present in both.
        transform, pre_transform: PyG transforms (``pre_transform`` is applied before caching).
        log (bool): show a tqdm progress bar while processing (default ``True``).
        force_reload (bool): re-process every slide (default ``False``).

    Shapes:
        - **output:** ``Data`` with ``x [N, D]`` float32, ``pos [N, 2]`` int64 level-0 px,
          ``edge_index [2, E]``, ``y [1]``, ``slide_id``, ``case_id`` and the source attributes.

    Raises:
        ValueError: naming them, for slides without labels and labels without slides
            (``strict=True``), a cache folder inside ``root``, a bad ``graph``.

    Example:
        >>> import tempfile
        >>> from graphmil.io import write_synthetic_folder
        >>> f = write_synthetic_folder(tempfile.mkdtemp(), layout="clam_h5")
        >>> ds = FeatureBagDataset(f.root, f.labels_path, cache_dir=tempfile.mkdtemp(), log=False)
        >>> ds.label_map
        {'normal': 0, 'tumor': 1}
    """

    def __init__(
        self,
        root: PathLike,
        labels: Any,
        cache_dir: Optional[PathLike] = None,
        graph: Union[str, Callable, None] = "grid8",
        label_column: str = "label",
        label_map: Optional[Dict[str, int]] = None,
        encoder: Optional[str] = None,
        patches_dir: Optional[PathLike] = None,
        strict: bool = True,
        transform: Optional[Callable] = None,
        pre_transform: Optional[Callable] = None,
        log: bool = True,
        force_reload: bool = False,
    ) -> None:
        self.source_root = Path(root).resolve()
        self.graph = graph
        self.graph_transform = _resolve_graph(graph)
        self.label_column = label_column
        self.encoder = encoder
        self.strict = strict
        self.info: FolderInfo = scan(root, encoder=encoder, patches_dir=patches_dir)
        self.patches_dir = self.info.patches_dir

        table = read_labels(labels, label_column)
        empty = {s.slide_id for s in self.info.empty}
        present = {s.slide_id: s for s in self.info.slides}
        no_label = [s for s in present if s not in table or table[s][1] is None]
        no_slide = [s for s in table if s not in present and s not in empty]
        problems = []
        if no_label:
            problems.append(f"{len(no_label)} slide(s) in {self.info.feature_dir} without a label in column "
                            f"'{label_column}': {', '.join(sorted(no_label)[:10])}{' ...' if len(no_label) > 10 else ''}")
        if no_slide:
            problems.append(f"{len(no_slide)} labelled slide(s) with no feature file in {self.info.feature_dir}: "
                            f"{', '.join(sorted(no_slide)[:10])}{' ...' if len(no_slide) > 10 else ''}")
        if problems:
            if strict:
                raise ValueError("FeatureBagDataset: " + "; ".join(problems) + " (pass strict=False to keep the matching ones)")
            warnings.warn("FeatureBagDataset: " + "; ".join(problems) + "; using the slides present in both", UserWarning, stacklevel=2)
        self.slides = [s for s in self.info.slides if s.slide_id not in no_label]
        if not self.slides:
            raise ValueError(f"FeatureBagDataset: no labelled, non-empty slide in {self.info.feature_dir}")
        self.slide_ids: List[str] = [s.slide_id for s in self.slides]
        self.case_ids: List[str] = [table[s][0] for s in self.slide_ids]
        raw = [table[s][1] for s in self.slide_ids]
        self.label_map, values = self._encode_labels(raw, label_map)
        self._labels: List[Any] = values

        key = json.dumps(
            {
                "v": CACHE_VERSION,
                "features": str(self.info.feature_dir.resolve()),
                "patches": str(self.patches_dir.resolve()) if self.patches_dir else None,
                "layout": self.info.layout,
                "encoder": self.info.encoder,
                "graph": repr(self.graph_transform),
                "pre_transform": repr(pre_transform),
            },
            sort_keys=True,
        )
        self.cache_key = hashlib.sha1(key.encode()).hexdigest()[:16]
        base = Path(cache_dir) if cache_dir is not None else default_cache_root() / "feature_bags"
        self.cache_dir = (base / self.cache_key).resolve()
        for src in {self.source_root, self.info.feature_dir.resolve()}:
            if self.cache_dir == src or src in self.cache_dir.parents:
                raise ValueError(f"FeatureBagDataset: cache_dir {self.cache_dir} is inside the source folder {src}; "
                                 "graphmil never writes into source folders")
        self._names = []
        for s in self.slides:
            pfile = None
            if self.patches_dir is not None:
                for cand in (self.patches_dir / f"{s.slide_id}.h5", self.patches_dir / f"{s.slide_id}_patches.h5"):
                    if cand.is_file():
                        pfile = cand
                        break
            self._names.append(f"{s.slide_id}.{_file_signature(s.path, pfile)}.pt")
        super().__init__(str(self.cache_dir), transform, pre_transform, None, log, force_reload)

    # ------------------------------------------------------------------ labels
    @staticmethod
    def _encode_labels(raw: List[str], label_map: Optional[Dict[str, int]]):
        if label_map is not None:
            unknown = sorted({r for r in raw if r not in label_map})
            if unknown:
                raise ValueError(f"FeatureBagDataset: labels {unknown} are not in 'label_map' {label_map}")
            return dict(label_map), [int(label_map[r]) for r in raw]
        try:
            nums = [float(r) for r in raw]
        except ValueError:
            nums = None
        if nums is not None:
            if all(v.is_integer() for v in nums):
                return None, [int(v) for v in nums]
            return None, nums
        classes = sorted(set(raw))
        mapping = {c: i for i, c in enumerate(classes)}
        return mapping, [mapping[r] for r in raw]

    @property
    def targets(self) -> torch.Tensor:
        """Bag labels of all slides ``[num_slides]`` (from the labels table; no file is read)."""
        if any(isinstance(v, float) for v in self._labels):
            return torch.tensor(self._labels, dtype=torch.float32)
        return torch.tensor(self._labels, dtype=torch.long)

    @property
    def num_classes(self) -> int:
        if self.label_map is not None:
            return len(self.label_map)
        t = self.targets
        return int(t.max()) + 1 if not t.is_floating_point() else 1

    # ------------------------------------------------------------------ PyG Dataset API
    @property
    def raw_dir(self) -> str:
        return str(self.info.feature_dir)

    @property
    def processed_dir(self) -> str:
        return str(self.cache_dir)

    @property
    def raw_file_names(self) -> List[str]:
        return [s.path.name for s in self.slides]

    @property
    def processed_file_names(self) -> List[str]:
        return list(self._names)

    def process(self) -> None:
        from tqdm.auto import tqdm

        todo = [i for i, name in enumerate(self._names) if self.force_reload or not (self.cache_dir / name).is_file()]
        for i in tqdm(todo, desc="graphmil: processing slides", unit="slide", disable=not self.log):
            slide = self.slides[i]
            data = read_bag(slide.path, patches_dir=self.patches_dir)
            if self.graph_transform is not None:
                data = self.graph_transform(data)
            if self.pre_transform is not None:
                data = self.pre_transform(data)
            write_bag(self.cache_dir / self._names[i], data)
            # drop stale versions of this slide (source file changed)
            for old in self.cache_dir.glob(f"{glob.escape(slide.slide_id)}.*.pt"):
                if old.name != self._names[i] and re.fullmatch(re.escape(slide.slide_id) + r"\.[0-9a-f]{12}\.pt", old.name):
                    old.unlink(missing_ok=True)

    def len(self) -> int:
        return len(self.slides)

    def get(self, idx: int) -> Data:
        data = read_bag(self.cache_dir / self._names[idx])
        label = self._labels[idx]
        data.y = torch.tensor([label], dtype=torch.float32 if isinstance(label, float) else torch.long)
        data.case_id = self.case_ids[idx]
        return data

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({len(self)}, layout={self.info.layout!r}, graph={self.graph_transform!r}, "
            f"label_column={self.label_column!r})"
        )

