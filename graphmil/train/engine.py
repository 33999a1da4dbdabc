"""The training engine: ``fit``, ``evaluate``, ``cross_validate``, checkpoints and run directories.

One loop serves every registered model: the loss is the sum of ``model.losses(out, batch, epoch)``
(task loss + the model's own terms: DSMIL's instance stream, ACMIL branches, CASii instance losses,
AINet region and consistency terms) plus ``λ · AEM`` on ``out.attention`` when
``config.aem_lambda > 0``. Under ``torchrun`` the same loop runs with DDP and a
``DistributedSampler`` (see :mod:`graphmil.train.distributed`).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from graphmil.train.config import DataConfig, TrainConfig
from graphmil.train.distributed import dist_info

__all__ = [
    "FitResult", "CVResult", "Evaluation", "fit", "evaluate", "cross_validate", "seed_everything",
    "make_run_dir", "save_checkpoint", "load_checkpoint", "build_dataset", "summarize",
    "lr_factor", "bag_labels", "subset",
]


# ----------------------------------------------------------------------------------------- utils
def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


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
            raise ValueError(f"run directory '{path}' already exists; choose a new one "
                             "(graphmil never overwrites a run)")
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


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def subset(dataset, idx: Sequence[int]):
    """The bags ``idx`` of ``dataset``: a PyG ``Dataset`` view, or a list for other sequences."""
    from torch_geometric.data import Dataset

    idx = [int(i) for i in idx]
    if isinstance(dataset, Dataset):
        return dataset.index_select(idx)
    return [dataset[i] for i in idx]


def bag_labels(dataset) -> np.ndarray:
    """Bag labels ``[B]`` (int) of a dataset of bags (reads each bag's ``y``)."""
    ys = []
    for i in range(len(dataset)):
        y = dataset[i].y
        ys.append(int(y.view(-1)[0]) if y.numel() == 1 else int(y.view(-1).argmax()))
    return np.asarray(ys, dtype=np.int64)


def lr_factor(epoch: int, config: TrainConfig) -> float:
    r"""Learning-rate multiplier of ``epoch`` (0-based), stepped per epoch.

    .. math::
        f(e) = \begin{cases}
          s + (1 - s)\,\frac{e}{W} & e < W \quad(\text{linear warm-up from } s)\\
          m + (1 - m)\,\tfrac12\big(1 + \cos(\pi\,\tfrac{e - W}{E - W})\big) & \text{cosine}\\
          1 & \text{constant / none}\end{cases}

    with ``W = warmup_epochs``, ``s = warmup_start_factor``, ``m = min_lr_factor``, ``E = epochs``.
    """
    W, s = config.warmup_epochs, config.warmup_start_factor
    if epoch < W:
        return s + (1.0 - s) * epoch / W
    if config.scheduler.lower() == "cosine":
        span = max(1, config.epochs - W)
        m = config.min_lr_factor
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * (epoch - W) / span))
    return 1.0


def _build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer.lower() == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _class_weights(labels: np.ndarray, num_classes: int, spec) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(pos_weight, class_weight)`` for :func:`bag_task_loss` from ``config.class_weights``."""
    if spec is None:
        return None, None
    C = max(2, num_classes)
    if spec == "balanced":
        counts = np.bincount(labels, minlength=C).astype(np.float64)
        if (counts == 0).any():
            raise ValueError(f"class_weights='balanced': the training split has no bag of class(es) "
                             f"{np.flatnonzero(counts == 0).tolist()}")
        w = counts.sum() / (C * counts)
    else:
        w = np.asarray(spec, dtype=np.float64)
        if w.shape != (C,) or (w <= 0).any():
            raise ValueError(f"class_weights: expected {C} positive weights, got {list(spec)}")
    if num_classes == 1:
        return torch.tensor([w[1] / w[0]], dtype=torch.float32), None
    return None, torch.tensor(w, dtype=torch.float32)


# -------------------------------------------------------------------------------------- results
@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        model: the trained model (best weights if a validation set was given and
            ``restore_best``; else the last epoch's).
        history: one dict per epoch (``epoch``, ``lr``, ``train_loss``, the loss terms and the
            validation metrics prefixed ``val_``).
        best_epoch / best_score: the epoch (0-based) and value of ``config.monitor`` kept.
        epochs_run: epochs trained in total (early stopping may stop before ``config.epochs``).
        run_dir: where checkpoints/history were written (``None`` if nothing was written).
        checkpoints: ``{"best": path, "last": path}`` when a run directory was used.
    """

    model: torch.nn.Module
    history: List[Dict[str, float]]
    best_epoch: int
    best_score: float
    epochs_run: int
    run_dir: Optional[str] = None
    checkpoints: Dict[str, str] = field(default_factory=dict)


class Evaluation(dict):
    """A ``dict`` of metrics (what :func:`evaluate` returns), with the raw predictions under
    ``.predictions``: ``bag_logits [B, C]``, ``bag_prob``, ``bag_label [B]``, ``bag_pred [B]``,
    ``slide_id`` (list), ``instance_score [N]``, ``instance_bag [N]``, ``y_inst [N]`` (or
    ``None``), ``attention [N]`` (head mean, or ``None``), ``pos [N, 2]`` (or ``None``)."""

    def __init__(self, metrics: Dict[str, float], predictions: Dict[str, Any]):
        super().__init__(metrics)
        self.predictions = predictions


@dataclass
class CVResult:
    """What :func:`cross_validate` returns: ``rows`` (one dict per seed × fold with its test
    metrics), ``summary`` (``{metric: {"mean", "std"}}``), and the ``run_dir`` written."""

    rows: List[Dict[str, Any]]
    summary: Dict[str, Dict[str, float]]
    run_dir: Optional[str] = None

    def table(self, metrics: Sequence[str] = ("auroc", "accuracy", "f1", "instance_auroc")) -> str:
        """One line per metric, ``mean ± std``."""
        return "\n".join(f"{m}: {self.summary[m]['mean']:.4f} ± {self.summary[m]['std']:.4f}"
                         for m in metrics if m in self.summary)


def summarize(rows: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """``{key: {"mean", "std", "n"}}`` over the numeric keys of ``rows`` (NaNs skipped; std with
    ``ddof = 0`` as the MIL papers report)."""
    out: Dict[str, Dict[str, float]] = {}
    keys = [k for k in rows[0] if k not in ("seed", "fold")] if rows else []
    for k in keys:
        vals = [r.get(k) for r in rows]
        vals = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        vals = [v for v in vals if not math.isnan(v)]
        if vals:
            out[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}
    return out


# ---------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str, model: torch.nn.Module, optimizer=None, scheduler=None,
                    epoch: int = 0, config: Optional[TrainConfig] = None,
                    model_spec: Optional[Dict[str, Any]] = None, **state) -> str:
    """Write ``{model, optimizer, scheduler, epoch, config, model_spec, ...}`` to ``path``
    (atomically: a temporary file then ``os.replace``)."""
    module = getattr(model, "module", model)
    ckpt = {
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "config": dataclasses.asdict(config) if config is not None else None,
        "model_spec": model_spec,
        **state,
    }
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path


def _load_state(model: torch.nn.Module, state: Dict[str, Tensor]) -> None:
    # Buffers whose size depends on the data (CASii's key bank) take the checkpoint's shape.
    own = dict(model.named_buffers())
    for name, value in state.items():
        if name in own and own[name].shape != value.shape:
            mod_name, _, buf = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            mod._buffers[buf] = torch.empty_like(value)
    model.load_state_dict(state)


def load_checkpoint(path: str, map_location: str = "cpu"):
    """Rebuild the model of a checkpoint written by :func:`fit` / :func:`cross_validate`.

    Returns:
        ``(model, checkpoint_dict)`` with the model in eval mode.

    Raises:
        ValueError: naming the file if it does not exist or holds no ``model_spec``.
    """
    from graphmil.models import create_model

    if not os.path.isfile(path):
        raise ValueError(f"checkpoint '{path}' does not exist")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    spec = ckpt.get("model_spec") if isinstance(ckpt, dict) else None
    if not spec:
        raise ValueError(f"checkpoint '{path}' has no 'model_spec' (was it written by graphmil.train?)")
    model = create_model(spec["name"], spec["in_channels"], spec.get("num_classes", 1),
                         **spec.get("kwargs", {}))
    _load_state(model, ckpt["model"])
    model.eval()
    return model, ckpt


# ------------------------------------------------------------------------------------------ loss
def _loss_terms(model, out, batch, epoch: int, cfg: TrainConfig, aem, pos_weight, class_weight,
                warned: Dict[str, bool]) -> Dict[str, Tensor]:
    from graphmil.models.base import bag_task_loss

    terms = dict(model.losses(out, batch, epoch))
    if pos_weight is not None or class_weight is not None:
        if "task" in terms:
            terms["task"] = bag_task_loss(out.bag_logits, batch.y, pos_weight=pos_weight,
                                          class_weight=class_weight)
        elif not warned.get("cw"):
            warnings.warn(f"class_weights: {type(model).__name__}.losses has no 'task' term; "
                          "class weights are not applied", RuntimeWarning)
            warned["cw"] = True
    if aem is not None:
        if out.attention is None:
            raise ValueError(f"aem_lambda > 0 needs a model with attention; {type(model).__name__} "
                             "returns attention=None")
        index = out.batch if out.batch is not None else batch.batch
        terms["aem"] = aem(out.attention, index, dim_size=out.bag_logits.size(0))
    return terms


def _bag_count(batch) -> int:
    return int(batch.num_graphs) if hasattr(batch, "num_graphs") else 1


# ------------------------------------------------------------------------------------------- fit
def fit(model: torch.nn.Module, train_set, val_set=None, config: Optional[TrainConfig] = None,
        run_dir: Optional[str] = None, resume: bool = False,
        model_spec: Optional[Dict[str, Any]] = None) -> FitResult:
    r"""Train ``model`` on ``train_set`` (a sequence / PyG dataset of bags).

    Every step minimises

    .. math::
        L = \sum_{t} L_t(\text{model.losses}(out, batch, epoch)) + \lambda\, L_{AEM}(a)

    with ``λ = config.aem_lambda`` (AEM on ``out.attention``; an error for a model without
    attention). ``model.prepare(train_set)`` is called once first (CASii builds its key bank from
    the training split only). With a validation set, ``config.monitor`` is evaluated after each
    epoch; the best epoch is kept (``best.pt``) and training stops after ``config.patience`` epochs
    without improvement. Under ``torchrun`` the model is wrapped in DDP and the bags are sharded
    by a ``DistributedSampler``; the shuffling is the same as one process (the sampler is used
    with one replica too), so ``P`` processes × batch ``b`` follow the same trajectory as one
    process × batch ``P·b`` (up to float summation order) when ``len(train_set)`` is divisible by
    ``P`` and the model has no batch-dependent randomness.

    Args:
        model: a :class:`graphmil.models.MILModel`.
        train_set: training bags.
        val_set: validation bags (default ``None``: no early stopping, last epoch kept).
        config (TrainConfig): hyperparameters (default ``TrainConfig()``).
        run_dir (str, optional): where ``checkpoints/{best,last}.pt``, ``history.csv``,
            ``config.yaml`` and ``fit.json`` go. It must not exist (unless ``resume``); ``None``
            writes nothing.
        resume (bool): continue from ``run_dir/checkpoints/last.pt`` (default ``False``).
        model_spec (dict, optional): ``{"name", "in_channels", "num_classes", "kwargs"}`` stored in
            the checkpoints so :func:`load_checkpoint` can rebuild the model.

    Returns:
        :class:`FitResult`.
    """
    from tqdm.auto import tqdm
    from torch.utils.data.distributed import DistributedSampler
    from torch_geometric.loader import DataLoader

    cfg = config or TrainConfig()
    info = dist_info()
    main = info.rank == 0
    if len(train_set) == 0:
        raise ValueError("fit: 'train_set' is empty")

    # run directory: checked before anything is written
    if run_dir is not None:
        last_path = os.path.join(run_dir, "checkpoints", "last.pt")
        if resume:
            if not os.path.isfile(last_path):
                raise ValueError(f"fit: cannot resume, '{last_path}' does not exist")
        elif main and os.path.exists(run_dir):
            raise ValueError(f"run directory '{run_dir}' already exists; choose a new one "
                             "(graphmil never overwrites a run)")
    elif resume:
        raise ValueError("fit: resume=True needs 'run_dir'")

    seed_everything(cfg.seed)
    device = _device(cfg.device)
    if info.is_distributed and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    model.to(device)
    if hasattr(model, "prepare"):
        import inspect
        if "progress" in inspect.signature(model.prepare).parameters:
            model.prepare(train_set, progress=cfg.progress and main)
        else:
            model.prepare(train_set)
        model.to(device)

    aem = None
    if cfg.aem_lambda > 0:
        from graphmil.losses import AEMLoss
        aem = AEMLoss(cfg.aem_lambda, normalize=cfg.aem_normalize)

    num_classes = getattr(model, "num_classes", 1)
    pos_weight = class_weight = None
    if cfg.class_weights is not None:
        pos_weight, class_weight = _class_weights(bag_labels(train_set), num_classes, cfg.class_weights)
        pos_weight = pos_weight.to(device) if pos_weight is not None else None
        class_weight = class_weight.to(device) if class_weight is not None else None

    optimizer = _build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, cfg))

    start_epoch, best_score, best_epoch, bad_epochs = 0, None, -1, 0
    history: List[Dict[str, float]] = []
    best_state = None
    if resume:
        ckpt = torch.load(last_path, map_location=device, weights_only=False)
        _load_state(model, ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch = int(ckpt["epoch"])
        best_score, best_epoch = ckpt.get("best_score"), ckpt.get("best_epoch", -1)
        bad_epochs, history = ckpt.get("bad_epochs", 0), list(ckpt.get("history", []))
        if ckpt.get("rng") is not None:
            torch.set_rng_state(ckpt["rng"])

    train_model = model
    if info.is_distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.ddp_find_unused_parameters)
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=cfg.seed, drop_last=False)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                        num_workers=cfg.num_workers)

    mode = cfg.monitor_mode
    if mode == "auto":
        mode = "min" if "loss" in cfg.monitor and cfg.monitor != "auroc_minus_loss" else "max"
    ckdir = os.path.join(run_dir, "checkpoints") if run_dir is not None else None
    spec_state = dict(model_spec=model_spec)
    warned: Dict[str, bool] = {}

    epoch = start_epoch
    bar = tqdm(range(start_epoch, cfg.epochs), desc=f"fit {type(model).__name__}", unit="epoch",
               disable=not (cfg.progress and main), leave=False, dynamic_ncols=True)
    for epoch in bar:
        sampler.set_epoch(epoch)
        train_model.train()
        sums: Dict[str, float] = {}
        n_bags = 0
        for batch in loader:
            batch = batch.to(device)
            out = train_model(batch)
            terms = _loss_terms(model, out, batch, epoch, cfg, aem, pos_weight, class_weight, warned)
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fit: non-finite loss at epoch {epoch}: "
                                         f"{ {k: float(v) for k, v in terms.items()} }")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            b = _bag_count(batch)
            n_bags += b
            sums["train_loss"] = sums.get("train_loss", 0.0) + float(loss.detach()) * b
            for k, v in terms.items():
                sums[f"train_{k}"] = sums.get(f"train_{k}", 0.0) + float(v.detach()) * b
        row: Dict[str, float] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        row.update({k: v / max(1, n_bags) for k, v in sums.items()})
        scheduler.step()

        improved = False
        if val_set is not None and len(val_set) > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                ev = evaluate(model, val_set, batch_size=cfg.eval_batch_size, device=device)
            row.update({f"val_{k}": v for k, v in ev.items()})
            if cfg.monitor == "auroc_minus_loss":
                score = ev.get("auroc", float("nan")) - ev.get("loss", float("nan"))
            elif cfg.monitor in ev:
                score = ev[cfg.monitor]
            else:
                raise ValueError(f"fit: monitor '{cfg.monitor}' is not a validation metric; "
                                 f"known: {', '.join(sorted(ev))}, auroc_minus_loss")
            score = float(score)
            if best_score is None:
                improved = True
            elif not math.isnan(score):
                improved = math.isnan(best_score) or (score > best_score if mode == "max" else score < best_score)
        else:
            score = float("nan")
            improved = True  # no validation: the last epoch is the best
        history.append(row)
        if improved:
            best_score, best_epoch, bad_epochs = score, epoch, 0
            if ckdir is None:
                best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
        if main:
            bar.set_postfix(loss=f"{row.get('train_loss', float('nan')):.4f}",
                            **({cfg.monitor: f"{score:.4f}"} if val_set is not None else {}))
        if ckdir is not None and main:
            if not os.path.isdir(ckdir):  # created lazily: a run failing early leaves nothing
                from graphmil.train.config import dump_config
                make_run_dir(run_dir)
                os.makedirs(ckdir)
                dump_config(cfg, os.path.join(run_dir, "config.yaml"))
            state = dict(best_score=best_score, best_epoch=best_epoch, bad_epochs=bad_epochs,
                         history=history, rng=torch.get_rng_state(), **spec_state)
            save_checkpoint(os.path.join(ckdir, "last.pt"), model, optimizer, scheduler,
                            epoch + 1, cfg, **state)
            if improved:
                save_checkpoint(os.path.join(ckdir, "best.pt"), model, optimizer, scheduler,
                                epoch + 1, cfg, **state)
        stop = (cfg.patience is not None and val_set is not None and bad_epochs >= cfg.patience
                and epoch + 1 >= cfg.min_epochs)
        if stop:
            break
    bar.close()
    epochs_run = len(history)

    if info.is_distributed:
        torch.distributed.barrier()
    if val_set is not None and cfg.restore_best and best_epoch != (history[-1]["epoch"] if history else -1):
        if ckdir is not None:
            _load_state(model, torch.load(os.path.join(ckdir, "best.pt"), map_location=device,
                                          weights_only=False)["model"])
        elif best_state is not None:
            model.load_state_dict(best_state)
    result = FitResult(model=model, history=history, best_epoch=int(best_epoch),
                       best_score=float("nan") if best_score is None else float(best_score),
                       epochs_run=epochs_run, run_dir=run_dir)
    if run_dir is not None:
        result.checkpoints = {"best": os.path.join(ckdir, "best.pt"), "last": os.path.join(ckdir, "last.pt")}
        if main:
            _write_rows(os.path.join(run_dir, "history.csv"), history, overwrite=True)
            with open(os.path.join(run_dir, "fit.json"), "w") as f:
                json.dump({"best_epoch": result.best_epoch, "best_score": result.best_score,
                           "monitor": cfg.monitor, "epochs_run": epochs_run,
                           "model_spec": model_spec}, f, indent=2, default=str)
    return result


def _write_rows(path: str, rows: Sequence[Dict[str, Any]], overwrite: bool = False) -> None:
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w" if overwrite else "x", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)


# -------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, batch_size: int = 16, device=None,
             threshold: float = 0.5) -> Evaluation:
    """Predict every bag of ``dataset`` and compute the metrics.

    Metrics: ``loss`` (the unweighted bag task loss), ``auroc``, ``accuracy``, ``f1``,
    ``precision``, ``recall`` (:func:`graphmil.metrics.bag_metrics`); when the bags carry ``y_inst``:
    ``instance_auroc`` (pooled), ``instance_auroc_sm`` (the Sm protocol) and
    ``instance_auroc_per_bag``; with attention: ``entropy_mean`` / ``entropy_norm_mean``.

    Args:
        model: a trained model.
        dataset: bags (each with ``y``).
        batch_size (int): bags per forward pass (default ``16``).
        device: default: the model's device.
        threshold (float): bag decision threshold (default ``0.5``).

    Returns:
        :class:`Evaluation` — a dict of metrics, with per-bag and per-instance arrays in
        ``.predictions``.
    """
    from torch_geometric.loader import DataLoader

    from graphmil.metrics.bag import bag_metrics, bag_predictions, bag_probabilities
    from graphmil.metrics.instance import attention_entropy_summary, instance_metrics
    from graphmil.models.base import bag_task_loss

    model = getattr(model, "module", model)
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    logits, ys, scores, inst_bag, y_inst, att, pos, sids = [], [], [], [], [], [], [], []
    offset = 0
    has_yinst = has_att = has_pos = True
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        batch = batch.to(device)
        out = model(batch)
        B = out.bag_logits.size(0)
        logits.append(out.bag_logits.float().cpu())
        ys.append(batch.y.cpu())
        idx = out.batch if out.batch is not None else batch.batch
        if out.instance_scores is not None:
            s = out.instance_scores.float()
            scores.append((s if s.dim() == 1 else s.mean(-1)).cpu())
        inst_bag.append(idx.cpu() + offset)
        sid = batch.get("slide_id")
        sids += list(sid) if isinstance(sid, (list, tuple)) else [sid] * B if sid is not None else [None] * B
        yi = batch.get("y_inst")
        has_yinst = has_yinst and yi is not None and yi.numel() == idx.numel()
        if has_yinst:
            y_inst.append(yi.cpu())
        has_att = has_att and out.attention is not None
        if has_att:
            a = out.attention.float()
            att.append((a if a.dim() == 1 else a.mean(-1)).cpu())
        pp = batch.get("pos")
        has_pos = has_pos and pp is not None and pp.size(0) == idx.numel()
        if has_pos:
            pos.append(pp.cpu())
        offset += B
    model.train(was_training)
    L = torch.cat(logits)
    Y = torch.cat(ys)
    metrics: Dict[str, float] = {"loss": float(bag_task_loss(L, Y))}
    probs = bag_probabilities(L)
    yb = Y.view(-1).numpy() if Y.dim() == 1 or Y.size(-1) == 1 else Y.argmax(-1).numpy()
    metrics.update(bag_metrics(None, yb, threshold=threshold, probs=probs))
    pred = bag_predictions(probs, threshold)
    S = torch.cat(scores).numpy() if scores else None
    I = torch.cat(inst_bag).numpy()
    YI = torch.cat(y_inst).numpy() if has_yinst and y_inst else None
    A = torch.cat(att).numpy() if has_att and att else None
    if S is not None and YI is not None:
        metrics.update(instance_metrics(S, YI, I, pred))
    if A is not None:
        e = attention_entropy_summary(A, I, offset)
        metrics["entropy_mean"] = e["entropy_mean"]
        metrics["entropy_norm_mean"] = e["entropy_norm_mean"]
    preds = {"bag_logits": L.numpy(), "bag_prob": probs, "bag_label": yb, "bag_pred": pred,
             "slide_id": sids, "instance_score": S, "instance_bag": I, "y_inst": YI,
             "attention": A, "pos": torch.cat(pos).numpy() if has_pos and pos else None}
    return Evaluation(metrics, preds)


# ------------------------------------------------------------------------------ cross-validation
def _split(idx: np.ndarray, labels: np.ndarray, fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    _, counts = np.unique(labels[idx], return_counts=True)
    strat = labels[idx] if len(counts) > 1 and counts.min() >= 2 else None
    try:
        a, b = train_test_split(idx, test_size=fraction, stratify=strat, random_state=seed)
    except ValueError:
        a, b = train_test_split(idx, test_size=fraction, random_state=seed)
    return np.sort(a), np.sort(b)


def cross_validate(dataset, model_name: str, model_kwargs: Optional[Dict[str, Any]] = None,
                   config: Optional[TrainConfig] = None, folds: int = 5, seeds: Sequence[int] = (0,),
                   val_fraction: float = 0.2, test_fraction: float = 0.25, num_classes: int = 1,
                   out_dir: Optional[str] = None,
                   splits: Optional[Iterable[Tuple[int, int, Sequence[int], Sequence[int]]]] = None,
                   progress: bool = True) -> CVResult:
    """``folds``-fold stratified cross-validation repeated over ``seeds``, with an inner
    validation split of each training fold for early stopping / model selection.

    For every seed ``s`` and fold ``k``: the model is built fresh (``create_model`` after
    ``seed_everything(s)``), fitted on the training part (minus ``val_fraction`` held out for
    validation; ``0`` = no validation, last epoch kept), and evaluated on the test fold.

    Args:
        dataset: bags.
        model_name (str): a name of :func:`graphmil.models.list_models`.
        model_kwargs (dict): the model's hyperparameters.
        config (TrainConfig): training settings (its ``seed`` is replaced by each seed).
        folds (int): outer folds; ``1`` = one stratified train/test split of ``test_fraction``
            (default ``5``).
        seeds (list of int): repetitions (default ``(0,)``).
        val_fraction (float): inner validation fraction (default ``0.2``).
        test_fraction (float): test fraction when ``folds == 1`` (default ``0.25``).
        num_classes (int): model output width (default ``1``).
        out_dir (str, optional): new run directory (must not exist): ``seed<s>_fold<k>/`` fit
            outputs, ``results.csv`` (one row per fold), ``summary.json`` (mean ± std).
        splits: explicit ``(seed, fold, train_idx, test_idx)`` tuples (e.g. MUSK1's published
            folds) instead of generated ones.
        progress (bool): a progress bar over folds (default ``True``).

    Returns:
        :class:`CVResult`.
    """
    from sklearn.model_selection import StratifiedKFold
    from tqdm.auto import tqdm

    from graphmil.models import create_model

    cfg = config or TrainConfig()
    model_kwargs = dict(model_kwargs or {})
    n = len(dataset)
    if n < 2:
        raise ValueError("cross_validate: 'dataset' needs at least 2 bags")
    labels = bag_labels(dataset)
    in_channels = int(dataset[0].x.size(1))
    create_model(model_name, in_channels, num_classes, **model_kwargs)  # fail fast on a bad name/kwarg
    main = dist_info().rank == 0
    if out_dir is not None and main:
        make_run_dir(out_dir)
    if splits is None:
        plan = []
        for s in seeds:
            if folds > 1:
                skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=s)
                for k, (tr, te) in enumerate(skf.split(np.zeros(n), labels)):
                    plan.append((s, k, tr, te))
            else:
                tr, te = _split(np.arange(n), labels, test_fraction, s)
                plan.append((s, 0, tr, te))
    else:
        plan = [(int(s), int(k), np.asarray(tr), np.asarray(te)) for s, k, tr, te in splits]
    rows: List[Dict[str, Any]] = []
    spec = {"name": model_name, "in_channels": in_channels, "num_classes": num_classes,
            "kwargs": model_kwargs}
    for s, k, tr, te in tqdm(plan, desc=f"cv {model_name}", unit="fold",
                             disable=not (progress and cfg.progress and main)):
        tr = np.asarray(tr)
        va = None
        if val_fraction > 0:
            tr, va = _split(tr, labels, val_fraction, s)
        fcfg = dataclasses.replace(cfg, seed=int(s))
        seed_everything(int(s))
        model = create_model(model_name, in_channels, num_classes, **model_kwargs)
        t0 = time.perf_counter()
        res = fit(model, subset(dataset, tr), subset(dataset, va) if va is not None else None, fcfg,
                  run_dir=os.path.join(out_dir, f"seed{s}_fold{k}") if out_dir else None,
                  model_spec=spec)
        train_time = time.perf_counter() - t0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ev = evaluate(res.model, subset(dataset, te), batch_size=cfg.eval_batch_size)
        rows.append({"seed": s, "fold": k, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
                     "train_time_s": train_time, **dict(ev)})
    summary = summarize(rows)
    if out_dir is not None and main:
        _write_rows(os.path.join(out_dir, "results.csv"), rows)
        with open(os.path.join(out_dir, "summary.json"), "x") as f:
            json.dump({"model": spec, "train": dataclasses.asdict(cfg), "folds": folds,
                       "seeds": list(seeds), "summary": summary}, f, indent=2, default=str)
    return CVResult(rows=rows, summary=summary, run_dir=out_dir)


# ---------------------------------------------------------------------------------------- data
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
