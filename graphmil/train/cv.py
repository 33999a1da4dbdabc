r"""Patient-grouped cross-validation with splits and out-of-fold predictions on disk, and resume.

Every split keeps all slides of a ``case_id`` on one side (train, validation or test), stratified
by label; a dataset without case ids groups by slide. A run directory holds::

    config.yaml / cv.json     what was run
    splits.csv                seed,fold,slide_id,case_id,split   (written before any training)
    seed<s>_fold<k>/          checkpoints/{best,last}.pt, history.csv, fit.json,
                              metrics.json (test metrics), predictions.csv (val + test slides)
    predictions.csv           every fold's rows; each slide is a test slide once per seed
    results.csv               one row per fold
    summary.json              mean ± std over folds, pooled out-of-fold metrics with bootstrap 95 % CI

``resume=True`` (``graphmil train --resume DIR``) keeps the finished folds, continues the
interrupted one from its ``last.pt`` and runs the rest: the result equals an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from graphmil.train.config import TrainConfig
from graphmil.train.data import (check_feature_widths, check_output_dir, dataset_meta, resolve_num_classes,
                                 source_folders, subset)
from graphmil.train.distributed import dist_info
from graphmil.train.runs import (FoldPlan, check_no_leak, make_run_dir, prediction_rows, read_rows, read_splits,
                                 write_rows, write_splits)

__all__ = ["CVResult", "cross_validate", "plan_folds", "summarize", "pooled_metrics", "check_model",
           "evaluate_run", "fold_checkpoint", "run_dataset", "run_folds"]

#: bootstrap replicates of the pooled out-of-fold metrics
BOOTSTRAP_SAMPLES = 1000


@dataclass
class CVResult:
    """What :func:`cross_validate` returns: ``rows`` (one dict per seed × fold with its test
    metrics), ``summary`` (``{metric: {"mean", "std", "n"}}`` over folds), ``pooled``
    (``{seed: {metric: {"value", "low", "high"}}}``: the out-of-fold predictions of each seed
    pooled, with a case-level bootstrap 95 % CI), ``predictions`` (the rows of
    ``predictions.csv``) and the ``run_dir`` written."""

    rows: List[Dict[str, Any]]
    summary: Dict[str, Dict[str, float]]
    run_dir: Optional[str] = None
    pooled: Optional[Dict[str, Dict[str, Dict[str, float]]]] = None
    predictions: Optional[List[Dict[str, Any]]] = None

    def table(self, metrics: Sequence[str] = ("auroc", "accuracy", "f1", "instance_auroc")) -> str:
        """One line per metric: ``mean ± std`` over folds, and the pooled out-of-fold value with
        its 95 % CI."""
        lines = []
        for m in metrics:
            if m not in self.summary:
                continue
            line = f"{m}: {self.summary[m]['mean']:.4f} ± {self.summary[m]['std']:.4f} over folds"
            for seed, pm in (self.pooled or {}).items():
                if m in pm:
                    v = pm[m]
                    line += f"; pooled out-of-fold (seed {seed}) {v['value']:.4f} [{v['low']:.4f}, {v['high']:.4f}]"
            lines.append(line)
        return "\n".join(lines)


def summarize(rows: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """``{key: {"mean", "std", "n"}}`` over the numeric keys of ``rows`` (NaNs skipped; std with
    ``ddof = 0`` as the MIL papers report)."""
    import math

    out: Dict[str, Dict[str, float]] = {}
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and k not in ("seed", "fold")]
    for k in keys:
        vals = [r.get(k) for r in rows]
        vals = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        vals = [v for v in vals if not math.isnan(v)]
        if vals:
            out[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}
    return out


def check_model(model_name: str, model_kwargs: Dict[str, Any], in_channels: int, num_classes: int):
    """Build the model once (a name typo, a wrong keyword argument or a bad value is an error
    naming it, before anything is written) and return it."""
    from graphmil.models import create_model
    from graphmil.models.registry import check_model_kwargs

    check_model_kwargs(model_name, model_kwargs)
    return create_model(model_name, in_channels, num_classes, **model_kwargs)


def plan_folds(meta, folds: int = 5, seeds: Sequence[int] = (0,), val_fraction: float = 0.2,
               test_fraction: float = 0.25, splits=None) -> List[FoldPlan]:
    """The folds of a cross-validation: generated (stratified by label, grouped by case) or
    explicit.

    Args:
        meta: :class:`graphmil.train.DatasetMeta` of the dataset.
        folds (int): outer folds; ``1`` = one grouped train/test split of ``test_fraction``.
        seeds: repetitions; each seed reshuffles.
        val_fraction (float): inner validation share of each training part (``0``: none),
            grouped by case too. An explicit split with a validation part keeps it.
        test_fraction (float): test share when ``folds == 1``.
        splits: ``None`` (generate), a path (``splits.csv`` or CLAM ``splits_{k}.csv`` file/folder,
            see :func:`graphmil.train.read_splits`), or ``(seed, fold, train_idx, test_idx)`` tuples.

    Raises:
        ValueError: from the splitters (too few bags / cases of a class for ``folds``) or the
            split files; a patient leak in explicit splits.
    """
    from graphmil.data.splits import holdout_split, stratified_kfold

    labels = meta.labels
    groups = np.asarray(meta.case_ids) if meta.has_case_ids else None
    if groups is not None and len(np.unique(groups)) == len(groups):
        groups = None  # one slide per case: exactly stratified splits

    def inner(train: List[int], seed: int, fold: int):
        if val_fraction <= 0 or len(train) < 4:
            return train, []
        tr = np.asarray(train)
        a, b = holdout_split(labels[tr], val_fraction, seed * 1000 + fold,
                             None if groups is None else groups[tr])
        return sorted(tr[a].tolist()), sorted(tr[b].tolist())

    plans: List[FoldPlan] = []
    if splits is None:
        for s in seeds:
            if folds > 1:
                for sp in stratified_kfold(labels, k=folds, seed=int(s), groups=groups, val_fraction=0.0):
                    tr, va = inner(list(sp.train), int(s), sp.fold)
                    plans.append(FoldPlan(int(s), sp.fold, tr, va, list(sp.test)))
            else:
                rest, test = holdout_split(labels, test_fraction, int(s), groups)
                tr, va = inner(rest, int(s), 0)
                plans.append(FoldPlan(int(s), 0, tr, va, test))
    elif isinstance(splits, (str, os.PathLike)):
        for p in read_splits(str(splits), meta.slide_ids, seed=int(seeds[0]) if seeds else 0):
            if not p.val and val_fraction > 0:
                p.train, p.val = inner(p.train, p.seed, p.fold)
            plans.append(p)
    else:
        for item in splits:
            if isinstance(item, FoldPlan):
                plans.append(item)
                continue
            s, k, tr, te = item
            tr, va = inner(sorted(int(i) for i in tr), int(s), int(k))
            plans.append(FoldPlan(int(s), int(k), tr, va, sorted(int(i) for i in te)))
    check_no_leak(plans, meta.case_ids, source=str(splits) if isinstance(splits, (str, os.PathLike)) else "splits")
    return plans


def pooled_metrics(rows: Sequence[Dict[str, Any]], class_names: Sequence[str],
                   num_samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Metrics of pooled out-of-fold predictions (rows of ``predictions.csv`` with
    ``split == "test"``), with a percentile bootstrap 95 % CI that resamples cases
    (:func:`graphmil.metrics.bootstrap_ci`): ``auroc``, ``accuracy``, ``f1``, ``precision``,
    ``recall``, ``balanced_accuracy``."""
    from graphmil.metrics.bag import bootstrap_ci, classification_summary

    test = [r for r in rows if r["split"] == "test"]
    if not test:
        return {}
    index = {c: i for i, c in enumerate(class_names)}
    y = np.asarray([index[str(r["label"])] for r in test], dtype=np.int64)
    P = np.asarray([[float(r[f"prob_{c}"]) for c in class_names] for r in test])
    pred = np.asarray([index[str(r["prediction"])] for r in test], dtype=np.int64)
    probs = P[:, 1] if P.shape[1] == 2 else P
    cases = [r["case_id"] for r in test]

    def metric(idx):
        return classification_summary(y[idx], probs[idx], pred[idx])

    return bootstrap_ci(metric, len(test), groups=cases, num_samples=num_samples, seed=seed)


def _clean_unfinished(fold_dir: str) -> bool:
    """Remove a fold folder that an interrupt left before its first checkpoint (only graphmil's
    own files in it); ``True`` if it is gone."""
    ours = {"config.yaml", "checkpoints", "history.csv", "history.csv.tmp"}
    if not os.path.isdir(fold_dir):
        return True
    names = set(os.listdir(fold_dir))
    ck = os.path.join(fold_dir, "checkpoints")
    if names <= ours and (not os.path.isdir(ck) or all(f.endswith(".tmp") for f in os.listdir(ck))):
        shutil.rmtree(fold_dir)
        return True
    return False


def cross_validate(dataset, model_name: str, model_kwargs: Optional[Dict[str, Any]] = None,
                   config: Optional[TrainConfig] = None, folds: int = 5, seeds: Sequence[int] = (0,),
                   val_fraction: float = 0.2, test_fraction: float = 0.25, num_classes: Optional[int] = None,
                   out_dir: Optional[str] = None,
                   splits: Union[None, str, Iterable] = None,
                   progress: bool = True, resume: bool = False, experiment=None,
                   bootstrap: int = BOOTSTRAP_SAMPLES, sources: Sequence = ()) -> CVResult:
    """``folds``-fold cross-validation, stratified by label and grouped by patient, repeated over
    ``seeds``, with an inner (grouped) validation split of each training part.

    Checked before anything is written: the labels against ``num_classes`` (inferred by
    default), the feature width of every bag (from shapes), the model name and its keyword
    arguments, the splits (no patient in two parts of a fold), and that ``out_dir`` is new and
    outside the source folders. Then ``splits.csv`` is written, and each fold is trained
    (:func:`graphmil.train.fit`), predicts its own validation and test slides
    (:func:`graphmil.train.predict`) and writes ``metrics.json`` and ``predictions.csv`` as it
    ends. For every seed and fold the model is built fresh after ``seed_everything(seed)``.

    Args:
        dataset: bags (a :class:`~graphmil.datasets.FeatureBagDataset` carries ``case_id``).
        model_name (str): a name of :func:`graphmil.models.list_models`.
        model_kwargs (dict): the model's hyperparameters.
        config (TrainConfig): training settings (its ``seed`` is replaced by each seed).
        folds (int): outer folds; ``1`` = one grouped train/test split of ``test_fraction``
            (default ``5``).
        seeds (list of int): repetitions (default ``(0,)``).
        val_fraction (float): inner validation fraction (default ``0.2``; ``0``: none, last epoch kept).
        test_fraction (float): test fraction when ``folds == 1`` (default ``0.25``).
        num_classes (int, optional): model output width (default ``None``: ``1`` for two classes,
            ``C`` for ``C > 2``).
        out_dir (str, optional): the run directory (must not exist, unless ``resume``).
        splits: explicit splits: a ``splits.csv`` / CLAM ``splits_{k}.csv`` path or folder, or
            ``(seed, fold, train_idx, test_idx)`` tuples (e.g. MUSK1's published folds).
        progress (bool): a progress bar over folds (default ``True``).
        resume (bool): continue the interrupted run in ``out_dir`` (default ``False``).
        experiment (ExperimentConfig, optional): written as ``config.yaml`` with the run.
        bootstrap (int): bootstrap replicates of the pooled CI (default ``1000``).
        sources (list of paths): folders ``out_dir`` must not be inside (default: the dataset's
            feature folder, when it has one).

    Returns:
        :class:`CVResult`.
    """
    from tqdm.auto import tqdm

    from graphmil.metrics.bag import ignore_undefined_metrics
    from graphmil.models import create_model
    from graphmil.train.config import dump_config
    from graphmil.train.inference import metrics_from_predictions, predict
    from graphmil.train.loop import fit, seed_everything

    cfg = config or TrainConfig()
    model_kwargs = dict(model_kwargs or {})
    main = dist_info().rank == 0
    # ---- every check before the first write
    if len(dataset) < 2:
        raise ValueError("cross_validate: 'dataset' needs at least 2 bags")
    meta = dataset_meta(dataset)
    in_channels = check_feature_widths(dataset, meta)
    num_classes = resolve_num_classes(meta, num_classes)
    probe = check_model(model_name, model_kwargs, in_channels, num_classes)
    spec = probe.spec() if hasattr(probe, "spec") else {
        "name": model_name, "in_channels": in_channels, "num_classes": num_classes, "kwargs": model_kwargs}
    del probe
    class_names = list(meta.class_names)[: max(2, num_classes)]
    if out_dir is not None:
        check_output_dir(out_dir, list(sources) + source_folders(dataset), "run directory")
        if resume:
            if not os.path.isfile(os.path.join(out_dir, "splits.csv")):
                raise ValueError(f"cannot resume '{out_dir}': it has no splits.csv (is it a graphmil run?)")
        elif os.path.exists(out_dir):
            raise ValueError(f"run directory '{out_dir}' already exists; choose a new one, or continue it "
                             "with resume (graphmil never overwrites a run)")
    elif resume:
        raise ValueError("cross_validate: resume=True needs 'out_dir'")
    if resume:
        plans = plan_folds(meta, folds, seeds, 0.0, test_fraction, os.path.join(out_dir, "splits.csv"))
    else:
        plans = plan_folds(meta, folds, seeds, val_fraction, test_fraction, splits)

    # ---- the run directory
    if out_dir is not None and main and not resume:
        make_run_dir(out_dir)
        write_splits(os.path.join(out_dir, "splits.csv"), plans, meta.slide_ids, meta.case_ids)
        with open(os.path.join(out_dir, "cv.json"), "x") as f:
            json.dump({"model": spec, "train": dataclasses.asdict(cfg), "folds": folds,
                       "seeds": [int(s) for s in seeds], "val_fraction": val_fraction,
                       "test_fraction": test_fraction, "num_classes": num_classes,
                       "class_names": class_names, "grouped_by_case": meta.has_case_ids,
                       "splits": str(splits) if isinstance(splits, (str, os.PathLike)) else
                       ("given" if splits is not None else "generated")}, f, indent=2, default=str)
        if experiment is not None:
            dump_config(experiment, os.path.join(out_dir, "config.yaml"))

    rows: List[Dict[str, Any]] = []
    all_preds: List[Dict[str, Any]] = []
    for plan in tqdm(plans, desc=f"cv {model_name}", unit="fold",
                     disable=not (progress and cfg.progress and main)):
        fold_dir = os.path.join(out_dir, plan.name) if out_dir else None
        done = (fold_dir is not None and resume and os.path.isfile(os.path.join(fold_dir, "predictions.csv"))
                and os.path.isfile(os.path.join(fold_dir, "metrics.json")))
        if done:
            with open(os.path.join(fold_dir, "metrics.json")) as f:
                rows.append(json.load(f))
            all_preds += read_rows(os.path.join(fold_dir, "predictions.csv"))
            continue
        resume_fit = False
        if fold_dir is not None and resume and os.path.exists(fold_dir):
            resume_fit = os.path.isfile(os.path.join(fold_dir, "checkpoints", "last.pt"))
            if not resume_fit and not _clean_unfinished(fold_dir):
                raise ValueError(f"cannot resume: '{fold_dir}' holds files graphmil did not write and no "
                                 "checkpoint; move it away and resume again")
        fcfg = dataclasses.replace(cfg, seed=int(plan.seed))
        seed_everything(int(plan.seed))
        model = create_model(model_name, in_channels, num_classes, **model_kwargs)
        t0 = time.perf_counter()
        res = fit(model, subset(dataset, plan.train), subset(dataset, plan.val) if plan.val else None, fcfg,
                  run_dir=fold_dir, resume=resume_fit, model_spec=spec, class_names=class_names)
        train_time = time.perf_counter() - t0
        parts = {i: "val" for i in range(len(plan.val))}
        parts.update({len(plan.val) + i: "test" for i in range(len(plan.test))})
        records = list(predict(res.model, subset(dataset, plan.val + plan.test),
                               batch_size=cfg.eval_batch_size))
        test_records = [r for r in records if parts[r.index] == "test"]
        with ignore_undefined_metrics():
            ev = metrics_from_predictions(test_records)
        row = {"seed": plan.seed, "fold": plan.fold, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
               "monitor": res.monitor, "train_time_s": train_time, **ev}
        rows.append(row)
        prows = prediction_rows(records, plan, parts, class_names)
        all_preds += prows
        if fold_dir is not None and main:
            os.makedirs(fold_dir, exist_ok=True)
            tmp = os.path.join(fold_dir, "metrics.json.tmp")
            with open(tmp, "w") as f:
                json.dump(row, f, indent=2, default=str)
            os.replace(tmp, os.path.join(fold_dir, "metrics.json"))
            write_rows(os.path.join(fold_dir, "predictions.csv"), prows)  # last: the fold is done
    summary = summarize(rows)
    pooled: Dict[str, Dict[str, Dict[str, float]]] = {}
    for s in dict.fromkeys(int(p.seed) for p in plans):
        pooled[str(s)] = pooled_metrics([r for r in all_preds if int(r["seed"]) == s], class_names,
                                        num_samples=bootstrap, seed=s)
    if out_dir is not None and main:
        write_rows(os.path.join(out_dir, "results.csv"), rows)
        write_rows(os.path.join(out_dir, "predictions.csv"), all_preds)
        tmp = os.path.join(out_dir, "summary.json.tmp")
        with open(tmp, "w") as f:
            json.dump({"model": spec, "train": dataclasses.asdict(cfg), "folds": folds,
                       "seeds": [int(s) for s in seeds], "num_classes": num_classes, "class_names": class_names,
                       "summary": summary, "pooled_out_of_fold": pooled}, f, indent=2, default=str)
        os.replace(tmp, os.path.join(out_dir, "summary.json"))
    return CVResult(rows=rows, summary=summary, run_dir=out_dir, pooled=pooled, predictions=all_preds)


def fold_checkpoint(fold_dir: str) -> str:
    """The checkpoint a finished fold's predictions came from: ``best.pt`` when ``fit.json`` says
    the best epoch was restored, else ``last.pt``."""
    which = "last"
    fj = os.path.join(fold_dir, "fit.json")
    if os.path.isfile(fj):
        with open(fj) as f:
            which = json.load(f).get("restored", "last")
    return os.path.join(fold_dir, "checkpoints", f"{which}.pt")


def run_dataset(run_dir: str):
    """The dataset of a run, rebuilt from its ``config.yaml`` (the ``data`` section).

    Raises:
        ValueError: the run has no ``config.yaml``.
    """
    from graphmil.train.config import load_config
    from graphmil.train.data import build_dataset

    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"'{run_dir}' has no config.yaml; pass the dataset")
    return build_dataset(load_config(cfg_path).data)


def run_folds(run_dir: str, dataset=None):
    """What scoring a finished run needs, checked before any work: ``(dataset, meta, plans,
    checkpoints)`` — the dataset (default: rebuilt from ``config.yaml``), its
    :class:`DatasetMeta`, the folds of ``splits.csv`` and each fold's kept checkpoint
    (:func:`fold_checkpoint`, ``{fold name: path}``), every one of them readable.

    Raises:
        ValueError: naming the file: no ``splits.csv``, a slide of it missing from the dataset, a
            missing or unreadable checkpoint.
    """
    from graphmil.train.checkpoint import read_checkpoint

    splits_csv = os.path.join(run_dir, "splits.csv")
    if not os.path.isfile(splits_csv):
        raise ValueError(f"'{run_dir}' has no splits.csv (is it a graphmil cross-validation run?)")
    if dataset is None:
        dataset = run_dataset(run_dir)
    meta = dataset_meta(dataset)
    plans = read_splits(splits_csv, meta.slide_ids)
    ckpts = {}
    for p in plans:
        path = fold_checkpoint(os.path.join(run_dir, p.name))
        read_checkpoint(path)
        ckpts[p.name] = path
    return dataset, meta, plans, ckpts


def evaluate_run(run_dir: str, dataset=None, batch_size: int = 16,
                 bootstrap: int = BOOTSTRAP_SAMPLES) -> CVResult:
    """Score every fold's checkpoint of a cross-validation run on that fold's own test slides
    (from ``splits.csv``) and pool the out-of-fold predictions per seed, with case-level
    bootstrap 95 % CIs (:func:`pooled_metrics`).

    Args:
        run_dir (str): a run directory written by :func:`cross_validate` / ``graphmil train``.
        dataset (optional): the bags (default: rebuilt from the run's ``config.yaml``).
        batch_size (int): bags per forward pass (default ``16``).
        bootstrap (int): bootstrap replicates (default ``1000``).

    Returns:
        :class:`CVResult` (``rows``: per-fold test metrics, ``pooled``, ``predictions`` with
        ``split == "test"`` rows only).

    Raises:
        ValueError: naming the file: a missing ``splits.csv`` or checkpoint, an unreadable
            checkpoint, a slide of ``splits.csv`` missing from the dataset.
    """
    from graphmil.metrics.bag import ignore_undefined_metrics
    from graphmil.train.checkpoint import load_checkpoint
    from graphmil.train.inference import metrics_from_predictions, predict

    dataset, meta, plans, ckpts = run_folds(run_dir, dataset)
    rows, preds, class_names = [], [], None
    for p in plans:
        model, _ = load_checkpoint(ckpts[p.name])
        if class_names is None:
            class_names = list(meta.class_names)[: max(2, int(model.num_classes))]
        records = list(predict(model, subset(dataset, p.test), batch_size=batch_size))
        with ignore_undefined_metrics():
            ev = metrics_from_predictions(records)
        rows.append({"seed": p.seed, "fold": p.fold, "checkpoint": ckpts[p.name], **ev})
        preds += prediction_rows(records, p, {i: "test" for i in range(len(p.test))}, class_names)
    pooled = {str(s): pooled_metrics([r for r in preds if int(r["seed"]) == s], class_names,
                                     num_samples=bootstrap, seed=s)
              for s in dict.fromkeys(p.seed for p in plans)}
    return CVResult(rows=rows, summary=summarize(rows), run_dir=run_dir, pooled=pooled, predictions=preds)
