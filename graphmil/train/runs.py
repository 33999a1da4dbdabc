"""Run directories and the files in them: ``splits.csv``, ``predictions.csv``, ``history.csv``.

``splits.csv`` (``seed,fold,slide_id,case_id,split``, split ∈ train/val/test) says which slide was
where in every fold; ``predictions.csv`` (``seed,fold,slide_id,case_id,label,prob_<class>...,
prediction,split``) holds each fold's predictions of its own validation and test slides, with the
label's original name. Both are written atomically (a temporary file, then ``os.replace``).
``cv.splits: FILE`` reads a ``splits.csv`` back, or CLAM's ``splits_{k}.csv`` (columns
``train,val,test`` of slide ids).
"""

from __future__ import annotations

import csv
import glob
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

__all__ = ["make_run_dir", "FoldPlan", "write_rows", "read_rows", "HistoryWriter", "write_splits",
           "read_splits", "check_no_leak", "prediction_rows", "PREDICTION_SPLITS"]

#: the splits whose predictions a fold writes
PREDICTION_SPLITS = ("val", "test")


def make_run_dir(path: Optional[str] = None, root: str = "runs", name: str = "run") -> str:
    """Create a new, empty run directory and return its path; never reuse an existing one.

    Args:
        path (str, optional): the exact directory to create. If it already exists a
            :class:`ValueError` is raised and nothing is touched.
        root (str): parent folder used when ``path`` is ``None`` (default ``"runs"``).
        name (str): base name under ``root``; the first free ``name``, ``name-1``, ``name-2``, ...
            is created (default ``"run"``).
    """
    if path is not None:
        if os.path.exists(path):
            raise ValueError(f"run directory '{path}' already exists; choose a new one, or continue "
                             "an interrupted run with resume (graphmil never overwrites a run)")
        os.makedirs(path)
        return path
    os.makedirs(root, exist_ok=True)
    for k in range(10000):
        cand = os.path.join(root, name if k == 0 else f"{name}-{k}")
        try:
            os.makedirs(cand)
            return cand
        except FileExistsError:
            continue
    raise ValueError(f"make_run_dir: no free run directory name under '{root}'")


@dataclass
class FoldPlan:
    """One fold of a cross-validation: seed, fold number and the dataset indices of each part."""

    seed: int
    fold: int
    train: List[int]
    val: List[int]
    test: List[int]

    @property
    def name(self) -> str:
        return f"seed{self.seed}_fold{self.fold}"

    def parts(self) -> Dict[str, List[int]]:
        return {"train": self.train, "val": self.val, "test": self.test}


def write_rows(path: str, rows: Sequence[Dict[str, Any]], fieldnames: Optional[List[str]] = None) -> str:
    """Write ``rows`` as CSV to ``path`` atomically (temporary file + ``os.replace``)."""
    keys: List[str] = list(fieldnames or [])
    if not keys:
        for r in rows:
            keys += [k for k in r if k not in keys]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    os.replace(tmp, path)
    return path


def read_rows(path: str) -> List[Dict[str, str]]:
    """The rows of a CSV file as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class HistoryWriter:
    """``history.csv``, one row appended and flushed per epoch.

    On resume the file is rewritten from the checkpoint's history first (a row written after the
    last checkpoint is dropped, so the file always matches ``last.pt``). A row with a column the
    file has not seen rewrites the file with the wider header.
    """

    def __init__(self, path: str, rows: Sequence[Dict[str, Any]] = ()) -> None:
        self.path = path
        self.rows: List[Dict[str, Any]] = list(rows)
        self.keys: List[str] = []
        for r in self.rows:
            self.keys += [k for k in r if k not in self.keys]
        if self.rows or os.path.exists(path):
            write_rows(path, self.rows, self.keys or None)

    def append(self, row: Dict[str, Any]) -> None:
        self.rows.append(row)
        new = [k for k in row if k not in self.keys]
        if new or not os.path.exists(self.path):
            self.keys += new
            write_rows(self.path, self.rows, self.keys)
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.keys).writerow(row)
            f.flush()
            os.fsync(f.fileno())


def write_splits(path: str, plans: Sequence[FoldPlan], slide_ids: Sequence[str],
                 case_ids: Sequence[str]) -> str:
    """``splits.csv``: one row per (seed, fold, slide) with the part the slide is in."""
    rows = []
    for p in plans:
        for part, idx in p.parts().items():
            for i in idx:
                rows.append({"seed": p.seed, "fold": p.fold, "slide_id": slide_ids[i],
                             "case_id": case_ids[i], "split": part})
    return write_rows(path, rows, ["seed", "fold", "slide_id", "case_id", "split"])


def check_no_leak(plans: Iterable[FoldPlan], case_ids: Sequence[str], source: str = "splits") -> None:
    """Every case (patient) is in one part only of every fold.

    Raises:
        ValueError: naming the case, its slides' parts and the fold.
    """
    cases = np.asarray(case_ids)
    for p in plans:
        where: Dict[str, set] = {}
        for part, idx in p.parts().items():
            for c in cases[np.asarray(idx, dtype=np.int64)] if len(idx) else []:
                where.setdefault(str(c), set()).add(part)
        leaks = {c: sorted(s) for c, s in where.items() if len(s) > 1}
        if leaks:
            c, parts = next(iter(leaks.items()))
            raise ValueError(f"{source}: patient leak in seed {p.seed} fold {p.fold}: case '{c}' has slides in "
                             f"{' and '.join(parts)} ({len(leaks)} case(s) in all); keep every slide of a "
                             "case on one side")


def _index_of(slide_ids: Sequence[str]) -> Dict[str, int]:
    from graphmil.datasets.feature_bags import normalize_slide_id

    return {normalize_slide_id(s): i for i, s in enumerate(slide_ids)}


def _clam_files(spec: str) -> List[str]:
    if os.path.isdir(spec):
        files = glob.glob(os.path.join(spec, "splits_*.csv"))
        files = [f for f in files if re.fullmatch(r"splits_\d+\.csv", os.path.basename(f))]
        if not files:
            raise ValueError(f"cv.splits: folder '{spec}' holds no splits_<k>.csv file")
        return sorted(files, key=lambda f: int(re.findall(r"\d+", os.path.basename(f))[-1]))
    if not os.path.isfile(spec):
        raise ValueError(f"cv.splits: '{spec}' does not exist")
    return [spec]


def read_splits(spec: str, slide_ids: Sequence[str], seed: int = 0) -> List[FoldPlan]:
    """Explicit splits from a file: graphmil's ``splits.csv`` (``seed,fold,slide_id,split``), a
    CLAM ``splits_{k}.csv`` (columns ``train,val,test`` of slide ids; ``k`` from the file name), or a
    folder of CLAM ``splits_{k}.csv`` files (one fold each, seed ``seed``).

    Raises:
        ValueError: naming the file and row for a slide id not in the dataset, a slide in two
            parts of one fold, an unknown split name or missing columns.
    """
    from graphmil.datasets.feature_bags import normalize_slide_id

    index = _index_of(slide_ids)
    plans: List[FoldPlan] = []
    for path in _clam_files(spec):
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = list(reader)
        if header is None:
            raise ValueError(f"{path}: the splits file is empty")
        header = [h.strip() for h in header]
        by_fold: Dict[tuple, Dict[str, List[int]]] = {}
        seen: Dict[tuple, Dict[int, str]] = {}

        def add(key, part, sid, line):
            sid = normalize_slide_id(sid)
            if sid not in index:
                raise ValueError(f"{path}, line {line}: slide '{sid}' is not in the dataset")
            i = index[sid]
            prev = seen.setdefault(key, {}).get(i)
            if prev is not None and prev != part:
                raise ValueError(f"{path}, line {line}: slide '{sid}' is in both '{prev}' and '{part}' "
                                 f"of fold {key[1]}")
            if prev is None:
                seen[key][i] = part
                by_fold.setdefault(key, {"train": [], "val": [], "test": []})[part].append(i)

        if {"seed", "fold", "slide_id", "split"} <= set(header):
            col = {h: header.index(h) for h in ("seed", "fold", "slide_id", "split")}
            for ln, r in enumerate(rows, start=2):
                part = r[col["split"]].strip()
                if part not in ("train", "val", "test"):
                    raise ValueError(f"{path}, line {ln}: split '{part}' is not train, val or test")
                add((int(r[col["seed"]]), int(r[col["fold"]])), part, r[col["slide_id"]], ln)
        elif {"train", "test"} <= set(header):
            m = re.findall(r"\d+", os.path.basename(path))
            key = (int(seed), int(m[-1]) if m else 0)
            by_fold.setdefault(key, {"train": [], "val": [], "test": []})
            for ln, r in enumerate(rows, start=2):
                for part in ("train", "val", "test"):
                    if part in header:
                        c = header.index(part)
                        v = r[c].strip() if c < len(r) else ""
                        if v and v.lower() != "nan":
                            add(key, part, v, ln)
        else:
            raise ValueError(f"{path}: a splits file needs columns seed,fold,slide_id,split (graphmil) "
                             f"or train,val,test (CLAM), has {header}")
        for (s, k), parts in sorted(by_fold.items()):
            if not parts["train"] or not parts["test"]:
                raise ValueError(f"{path}: fold {k} (seed {s}) has no {'train' if not parts['train'] else 'test'} slide")
            plans.append(FoldPlan(s, k, sorted(parts["train"]), sorted(parts["val"]), sorted(parts["test"])))
    keys = [(p.seed, p.fold) for p in plans]
    if len(set(keys)) != len(keys):
        raise ValueError(f"cv.splits: '{spec}' defines a (seed, fold) twice")
    return plans


def prediction_rows(records, plan: FoldPlan, split_of: Dict[int, str], class_names: Sequence[str],
                    threshold: float = 0.5) -> List[Dict[str, Any]]:
    """Rows of ``predictions.csv`` for :func:`graphmil.train.predict` records of one fold.

    ``split_of`` maps a record's ``index`` to its part (``val``/``test``); probabilities get one
    column ``prob_<class name>`` per class; ``label`` and ``prediction`` are class names.
    """
    rows = []
    for r in records:
        p = r.probabilities
        row = {"seed": plan.seed, "fold": plan.fold, "slide_id": r.slide_id, "case_id": r.case_id,
               "label": class_names[r.label] if r.label is not None else ""}
        for c in range(p.shape[0]):
            row[f"prob_{class_names[c] if c < len(class_names) else c}"] = f"{float(p[c]):.8g}"
        pred = r.prediction(threshold)
        row["prediction"] = class_names[pred] if pred < len(class_names) else str(pred)
        row["split"] = split_of[r.index]
        rows.append(row)
    return rows
