"""What the engine needs to know about a dataset before training: ids, labels, widths, and checks.

Everything here runs *before* a run directory is created, so a bad input (labels that do not fit
``num_classes``, a slide of another feature width, an output folder inside a source folder) is an
error naming the file, slide or key, and nothing is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from graphmil.train.config import DataConfig

__all__ = ["DatasetMeta", "dataset_meta", "subset", "bag_labels", "resolve_num_classes",
           "check_feature_widths", "check_output_dir", "source_folders", "build_dataset",
           "default_data_root"]


def subset(dataset, idx: Sequence[int]):
    """The bags ``idx`` of ``dataset``: a PyG ``Dataset`` view, or a list for other sequences."""
    from torch_geometric.data import Dataset

    idx = [int(i) for i in idx]
    if isinstance(dataset, Dataset):
        return dataset.index_select(idx)
    return [dataset[i] for i in idx]


def _label_of(y) -> int:
    return int(y.view(-1)[0]) if y.numel() == 1 else int(y.view(-1).argmax())


def _positions(dataset) -> Optional[List[int]]:
    """Indices of a PyG dataset view into its full dataset (``None`` for plain sequences)."""
    from torch_geometric.data import Dataset

    if isinstance(dataset, Dataset):
        return [int(i) for i in dataset.indices()]
    return None


@dataclass
class DatasetMeta:
    """What the engine knows about a dataset without training on it.

    Attributes:
        slide_ids: one id per bag (``bag<i>`` when a bag has none).
        case_ids: the patient of each bag (the slide id when the dataset has no case ids): the
            unit of every split.
        labels: bag labels ``[B]`` (class indices).
        class_names: the original name of each class index (``label_map`` of a feature folder;
            ``"0"``, ``"1"``, ... otherwise).
        in_channels: the feature width ``D`` shared by every bag.
        has_case_ids: whether the dataset carried case ids (else slides are their own cases).
    """

    slide_ids: List[str]
    case_ids: List[str]
    labels: np.ndarray
    class_names: List[str]
    in_channels: int
    has_case_ids: bool = False

    def __len__(self) -> int:
        return len(self.slide_ids)


def bag_labels(dataset) -> np.ndarray:
    """Bag labels ``[B]`` (int) of a dataset of bags, from its label table when it has one
    (``targets`` / ``labels``), else by reading each bag's ``y``."""
    for attr in ("targets", "labels"):
        t = getattr(type(dataset), attr, None)
        if isinstance(t, property):
            v = getattr(dataset, attr)
            arr = np.asarray(v.numpy() if hasattr(v, "numpy") else v)
            if arr.ndim == 1 and len(arr) == len(dataset) and arr.dtype.kind in "iub":
                return arr.astype(np.int64)
    return np.asarray([_label_of(dataset[i].y) for i in range(len(dataset))], dtype=np.int64)


def dataset_meta(dataset) -> DatasetMeta:
    """Collect slide ids, case ids, labels, class names and the feature width of ``dataset``.

    A :class:`~graphmil.datasets.FeatureBagDataset` (or a view of one) answers from its label table
    and folder scan, reading no feature file; other datasets are read bag by bag.

    Raises:
        ValueError: an empty dataset, a bag without ``y``, float labels, or two bags with the same
            slide id.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset has no bag")
    pos = _positions(dataset)
    if hasattr(dataset, "slide_ids") and hasattr(dataset, "case_ids") and hasattr(dataset, "info"):
        sel = pos if pos is not None else list(range(n))
        sids = [str(dataset.slide_ids[i]) for i in sel]
        cases = [str(dataset.case_ids[i]) for i in sel]
        targets = dataset.targets  # the label table: no feature file is read
        if targets.is_floating_point():
            raise ValueError(f"the labels of {dataset.info.feature_dir} are not class labels "
                             f"(non-integer values such as {float(targets[0])})")
        labels = targets.numpy()[sel].astype(np.int64)
        lm = getattr(dataset, "label_map", None)
        widths = {int(dataset.slides[i].num_features) for i in sel}
        in_channels = widths.pop() if len(widths) == 1 else -1
        has_cases = any(c != s for c, s in zip(cases, sids))
    else:
        sids, cases, labs, widths_l = [], [], [], []
        has_cases = False
        for i in range(n):
            b = dataset[i]
            if b.get("y") is None:
                raise ValueError(f"bag {i} has no label 'y'")
            if b.y.is_floating_point() and not bool((b.y == b.y.round()).all()):
                raise ValueError(f"bag {i} has a non-integer label {b.y.tolist()}; classification needs class labels")
            sid = b.get("slide_id")
            sids.append(str(sid) if sid is not None else f"bag{i}")
            case = b.get("case_id")
            has_cases = has_cases or case is not None
            cases.append(str(case) if case is not None else sids[-1])
            labs.append(_label_of(b.y))
            widths_l.append(int(b.x.size(1)) if b.get("x") is not None and b.x.dim() == 2 else -1)
        labels = np.asarray(labs, dtype=np.int64)
        lm = getattr(dataset, "label_map", None)
        in_channels = widths_l[0] if len(set(widths_l)) == 1 else -1
    seen: Dict[str, int] = {}
    for i, s in enumerate(sids):
        if s in seen:
            raise ValueError(f"two bags share the slide id '{s}' (bags {seen[s]} and {i}); slide ids must be unique")
        seen[s] = i
    if isinstance(lm, dict) and lm:
        names = [None] * (max(lm.values()) + 1)
        for k, v in lm.items():
            names[int(v)] = str(k)
        class_names = [nm if nm is not None else str(i) for i, nm in enumerate(names)]
    else:
        class_names = [str(c) for c in range(max(2, int(labels.max()) + 1 if labels.size else 2))]
    return DatasetMeta(sids, cases, labels, class_names, int(in_channels), has_cases)


def resolve_num_classes(meta: DatasetMeta, num_classes: Optional[int], where: str = "data.num_classes") -> int:
    r"""The model's output width for the labels of ``meta``.

    ``None`` infers it: two classes → ``1`` (one logit, BCE), ``C > 2`` classes → ``C``
    (cross-entropy). A given ``num_classes`` must fit the labels: ``1`` needs labels in
    :math:`\{0, 1\}`, ``C \ge 2`` needs labels in :math:`\{0..C-1\}`.

    Raises:
        ValueError: naming ``where``, the classes found and the value to use instead.
    """
    labels = meta.labels
    found = sorted(set(int(v) for v in labels))
    if labels.size and labels.min() < 0:
        raise ValueError(f"negative class label {int(labels.min())} (slide '{meta.slide_ids[int(labels.argmin())]}')")
    names = [meta.class_names[c] if c < len(meta.class_names) else str(c) for c in found]
    if len(found) < 2:
        raise ValueError(f"the labels hold a single class ({', '.join(names)}); a classifier needs two or more")
    n_cls = max(found) + 1
    if num_classes is None:
        return 1 if n_cls <= 2 else n_cls
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"{where} must be >= 1, got {num_classes}")
    if num_classes == 1 and n_cls > 2:
        raise ValueError(f"{where} is 1 (binary, one logit) but the labels have {n_cls} classes "
                         f"({', '.join(names)}); set {where}: {n_cls}, or leave it out to infer it")
    if num_classes > 1 and n_cls > num_classes:
        bad = [meta.slide_ids[i] for i in np.flatnonzero(labels >= num_classes)[:3]]
        raise ValueError(f"{where} is {num_classes} but the labels have {n_cls} classes "
                         f"({', '.join(names)}; e.g. slide(s) {', '.join(bad)}); set {where}: {n_cls}, "
                         "or leave it out to infer it")
    return num_classes


def check_feature_widths(dataset, meta: Optional[DatasetMeta] = None) -> int:
    """The feature width every bag shares, checked from shapes only (a feature folder's scan).

    Raises:
        ValueError: naming the slide files whose width differs from the others'.
    """
    meta = meta or dataset_meta(dataset)
    if meta.in_channels > 0:
        return meta.in_channels
    from collections import Counter

    if hasattr(dataset, "slides"):
        sel = _positions(dataset) or list(range(len(dataset)))
        widths = [(str(dataset.slides[i].path), int(dataset.slides[i].num_features)) for i in sel]
    else:
        widths = [(meta.slide_ids[i], int(dataset[i].x.size(1))) for i in range(len(dataset))]
    common, _ = Counter(w for _, w in widths).most_common(1)[0]
    odd = [f"{p} ({w} features)" for p, w in widths if w != common]
    raise ValueError(f"{len(odd)} slide(s) have a feature width other than the {common} of the rest: "
                     f"{', '.join(odd[:5])}{' ...' if len(odd) > 5 else ''}; were they extracted with another encoder?")


def source_folders(dataset=None, data: Optional[DataConfig] = None) -> List[Path]:
    """Folders a run must never write into: the data root and a feature folder's feature and
    coordinate directories."""
    out: List[Path] = []
    if data is not None and data.root and data.dataset.lower() == "folder":
        out.append(Path(data.root).resolve())
    info = getattr(dataset, "info", None)
    if info is not None:
        for p in (getattr(info, "root", None), getattr(info, "feature_dir", None), getattr(info, "patches_dir", None)):
            if p is not None:
                out.append(Path(p).resolve())
    return list(dict.fromkeys(out))


def check_output_dir(path: Optional[str], sources: Sequence[Path], what: str = "output directory") -> None:
    """Refuse an output directory that is, or is inside, one of ``sources``.

    Raises:
        ValueError: naming both folders.
    """
    if path is None:
        return
    target = Path(os.path.abspath(path)).resolve()
    for src in sources:
        if target == src or src in target.parents:
            raise ValueError(f"{what} '{path}' is inside the source folder {src}; graphmil never writes "
                             "into source folders: choose a folder outside it")


def default_data_root() -> Optional[str]:
    """``$GRAPHMIL_DATA``, else ``../shared/data`` next to the repository if present."""
    env = os.environ.get("GRAPHMIL_DATA")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    cand = os.path.abspath(os.path.join(here, "..", "..", "..", "shared", "data"))
    return cand if os.path.isdir(cand) else None


def build_dataset(data: DataConfig):
    """The dataset a :class:`DataConfig` names (``synthetic``, ``musk1``, ``musk2``,
    ``ucsb_breast``, ``colon_cancer`` or ``folder``).

    Raises:
        ValueError: for an unknown dataset name or a missing root.
    """
    name = data.dataset.lower()
    kw = dict(data.kwargs)
    if name == "synthetic":
        from graphmil.datasets import SyntheticBags
        return SyntheticBags(**kw)
    if name == "folder":
        if not data.root or not data.labels:
            raise ValueError("data: dataset 'folder' needs 'root' (the feature folder) and 'labels'")
        from graphmil.datasets import FeatureBagDataset
        return FeatureBagDataset(data.root, data.labels, **kw)
    known = ("synthetic", "musk1", "musk2", "ucsb_breast", "colon_cancer", "folder")
    if name not in known:
        import difflib
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"data: unknown dataset '{data.dataset}'.{hint} Known: {', '.join(known)}")
    root = data.root or default_data_root()
    if root is None:
        raise ValueError(f"data: dataset '{name}' needs 'root' (or $GRAPHMIL_DATA) pointing at the shared data")
    if name == "colon_cancer":
        from graphmil.datasets import ColonCancerBags
        return ColonCancerBags(root, **kw)
    from graphmil.datasets import ClassicMIL
    return ClassicMIL(name, root, **kw)
