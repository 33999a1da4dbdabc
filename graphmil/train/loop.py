r"""``fit``: the epoch loop around :func:`graphmil.train.train_step`, with validation, early
stopping, checkpoints every epoch and exact resume.

One loop serves every registered model. Under ``torchrun`` the same loop runs with DDP and a
``DistributedSampler`` (see :mod:`graphmil.train.distributed`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from graphmil.train.checkpoint import load_model_state, read_checkpoint, save_checkpoint
from graphmil.train.config import TrainConfig
from graphmil.train.distributed import dist_info
from graphmil.train.step import build_optimizer, build_scheduler, class_weights, train_step

__all__ = ["FitResult", "fit", "seed_everything", "validation_monitor"]

#: fewer validation bags than this in a class make a ranking metric (AUROC) meaningless
MIN_VAL_BAGS_PER_CLASS = 2


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _rng_state() -> Dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st) -> None:
    if isinstance(st, torch.Tensor):  # checkpoints of graphmil 0.1
        torch.set_rng_state(st)
        return
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        model: the trained model (best weights if a validation set was given and
            ``restore_best``; else the last epoch's).
        history: one dict per epoch (``epoch``, ``lr``, ``train_loss``, the loss terms and the
            validation metrics prefixed ``val_``).
        best_epoch / best_score: the epoch (0-based) and value of the monitor kept.
        epochs_run: epochs trained in total (early stopping may stop before ``config.epochs``).
        monitor: the validation metric actually used (see :func:`validation_monitor`).
        run_dir: where checkpoints/history were written (``None`` if nothing was written).
        checkpoints: ``{"best": path, "last": path}`` when a run directory was used.
    """

    model: torch.nn.Module
    history: List[Dict[str, float]]
    best_epoch: int
    best_score: float
    epochs_run: int
    monitor: Optional[str] = None
    run_dir: Optional[str] = None
    checkpoints: Dict[str, str] = field(default_factory=dict)


def validation_monitor(val_labels: Optional[np.ndarray], monitor: str,
                       class_names: Optional[List[str]] = None) -> Tuple[Optional[str], Optional[str]]:
    """The monitor that a validation split can support, and why it differs from ``monitor``.

    A classification metric (``auroc``, ``accuracy``, ``f1``, ``auroc_minus_loss``, ...) needs at
    least :data:`MIN_VAL_BAGS_PER_CLASS` validation bags of every class: with fewer, it falls back
    to the validation ``loss``; with fewer than two validation bags in all, to no selection (the
    last epoch is kept).

    Returns:
        ``(monitor or None, reason or None)``.
    """
    if val_labels is None or len(val_labels) == 0:
        return None, None
    if len(val_labels) < 2:
        return None, (f"the validation split has {len(val_labels)} bag: no epoch can be chosen on it; "
                      "the last epoch is kept")
    if "loss" in monitor and monitor != "auroc_minus_loss":
        return monitor, None  # the loss is defined on any validation split
    C = max(int(val_labels.max()) + 1, len(class_names) if class_names else 2)
    counts = np.bincount(val_labels, minlength=C)
    small = [int(c) for c in range(C) if counts[c] < MIN_VAL_BAGS_PER_CLASS]
    if small:
        def nm(c):
            return class_names[c] if class_names and c < len(class_names) else str(c)
        detail = ", ".join(f"{int(counts[c])} bag(s) of class '{nm(c)}'" for c in small)
        return "loss", (f"the validation split has {detail} (fewer than {MIN_VAL_BAGS_PER_CLASS} of each class): "
                        f"'{monitor}' on it says little, so the best epoch is chosen by validation 'loss' instead")
    return monitor, None


def _labels_of(bags) -> np.ndarray:
    from graphmil.train.data import bag_labels

    return bag_labels(bags)


def fit(model: torch.nn.Module, train_set, val_set=None, config: Optional[TrainConfig] = None,
        run_dir: Optional[str] = None, resume: bool = False,
        model_spec: Optional[Dict[str, Any]] = None, class_names: Optional[List[str]] = None) -> FitResult:
    r"""Train ``model`` on ``train_set`` (a sequence / PyG dataset of bags).

    Each step is :func:`graphmil.train.train_step` (task loss + the model's own terms +
    ``λ·AEM`` when ``config.aem_lambda > 0``). ``model.prepare(train_set)`` is called first when
    the model is not prepared yet (``model.is_prepared``; CASii builds its key bank from the
    training split only), or always with ``config.prepare="always"``; a CASii given ``keys=``
    keeps them, and a resumed fit never redoes the selection (the bank comes from ``last.pt``).
    With a validation set, the monitor (see :func:`validation_monitor`) is evaluated after each
    epoch; the best epoch is kept (``best.pt``) and training stops after ``config.patience`` epochs
    without improvement. Under ``torchrun`` the model is wrapped in DDP and the bags are sharded
    by a ``DistributedSampler``; the shuffling is the same as one process, so ``P`` processes ×
    batch ``b`` follow the same trajectory as one process × batch ``P·b`` (up to float summation
    order) when ``len(train_set)`` is divisible by ``P``.

    Args:
        model: a :class:`graphmil.models.MILModel`.
        train_set: training bags.
        val_set: validation bags (default ``None``: no early stopping, last epoch kept).
        config (TrainConfig): hyperparameters (default ``TrainConfig()``).
        run_dir (str, optional): where ``checkpoints/{best,last}.pt``, ``history.csv`` (a row
            appended and flushed every epoch), ``config.yaml`` and ``fit.json`` go. It must not
            exist (unless ``resume``) and is created at the end of the first epoch; ``None``
            writes nothing.
        resume (bool): continue from ``run_dir/checkpoints/last.pt``: weights, optimiser,
            schedule, early-stopping state and every RNG, so the result equals an uninterrupted
            run (default ``False``).
        model_spec (dict, optional): ``{"name", "in_channels", "num_classes", "kwargs"}`` stored in
            the checkpoints so :func:`load_checkpoint` can rebuild the model (default:
            ``model.spec()``).
        class_names (list of str, optional): class names for messages.

    Returns:
        :class:`FitResult`.
    """
    from tqdm.auto import tqdm
    from torch.utils.data.distributed import DistributedSampler
    from torch_geometric.loader import DataLoader

    from graphmil.metrics.bag import ignore_undefined_metrics
    from graphmil.train.inference import evaluate
    from graphmil.train.runs import HistoryWriter, make_run_dir

    cfg = config or TrainConfig()
    info = dist_info()
    main = info.rank == 0
    if len(train_set) == 0:
        raise ValueError("fit: 'train_set' is empty")
    if model_spec is None and hasattr(model, "spec"):
        model_spec = model.spec()

    # run directory: checked before anything is written
    ckpt = None
    if run_dir is not None:
        last_path = os.path.join(run_dir, "checkpoints", "last.pt")
        if resume:
            if not os.path.isfile(last_path):
                raise ValueError(f"fit: cannot resume, '{last_path}' does not exist")
            ckpt = read_checkpoint(last_path)  # a clear error for a corrupt file
        elif main and os.path.exists(run_dir):
            raise ValueError(f"run directory '{run_dir}' already exists; choose a new one "
                             "(graphmil never overwrites a run)")
    elif resume:
        raise ValueError("fit: resume=True needs 'run_dir'")

    val_labels = _labels_of(val_set) if val_set is not None and len(val_set) > 0 else None
    monitor, why = validation_monitor(val_labels, cfg.monitor, class_names)
    if why is not None and main and ckpt is None:
        warnings.warn(f"fit: {why}", UserWarning, stacklevel=2)

    seed_everything(cfg.seed)
    device = _device(cfg.device)
    if info.is_distributed and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    model.to(device)
    if ckpt is not None:
        load_model_state(model, ckpt["model"])  # before prepare: a resumed CASii keeps its key bank
    mode_prepare = getattr(cfg, "prepare", "auto")
    if hasattr(model, "prepare") and (mode_prepare == "always" and ckpt is None
                                      or not getattr(model, "is_prepared", True)):
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
        pos_weight, class_weight = class_weights(_labels_of(train_set), num_classes, cfg.class_weights)
        pos_weight = pos_weight.to(device) if pos_weight is not None else None
        class_weight = class_weight.to(device) if class_weight is not None else None

    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)

    start_epoch, best_score, best_epoch, bad_epochs = 0, None, -1, 0
    history: List[Dict[str, float]] = []
    best_state = None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch = int(ckpt["epoch"])
        best_score, best_epoch = ckpt.get("best_score"), ckpt.get("best_epoch", -1)
        bad_epochs, history = ckpt.get("bad_epochs", 0), list(ckpt.get("history", []))
        if ckpt.get("rng") is not None:
            _set_rng_state(ckpt["rng"])

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
    if mode == "auto" or monitor != cfg.monitor:
        mode = "min" if monitor is not None and "loss" in monitor and monitor != "auroc_minus_loss" else "max"
    ckdir = os.path.join(run_dir, "checkpoints") if run_dir is not None else None
    writer = HistoryWriter(os.path.join(run_dir, "history.csv"), history) if ckpt is not None and main else None

    bar = tqdm(range(start_epoch, cfg.epochs), desc=f"fit {type(model).__name__}", unit="epoch",
               disable=not (cfg.progress and main), leave=False, dynamic_ncols=True)
    for epoch in bar:
        sampler.set_epoch(epoch)
        train_model.train()
        sums: Dict[str, float] = {}
        n_bags = 0
        for batch in loader:
            batch = batch.to(device)
            res = train_step(train_model, batch, optimizer, epoch=epoch, aem=aem, pos_weight=pos_weight,
                             class_weight=class_weight, grad_clip=cfg.grad_clip)
            n_bags += res.num_bags
            sums["train_loss"] = sums.get("train_loss", 0.0) + res.loss * res.num_bags
            for k, v in res.terms.items():
                sums[f"train_{k}"] = sums.get(f"train_{k}", 0.0) + v * res.num_bags
        row: Dict[str, float] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        row.update({k: v / max(1, n_bags) for k, v in sums.items()})
        scheduler.step()

        if monitor is not None:
            with ignore_undefined_metrics():
                ev = evaluate(model, val_set, batch_size=cfg.eval_batch_size, device=device)
            row.update({f"val_{k}": v for k, v in ev.items()})
            if monitor == "auroc_minus_loss":
                score = ev.get("auroc", float("nan")) - ev.get("loss", float("nan"))
            elif monitor in ev:
                score = ev[monitor]
            else:
                raise ValueError(f"fit: monitor '{monitor}' is not a validation metric; "
                                 f"known: {', '.join(sorted(ev))}, auroc_minus_loss")
            score = float(score)
            if best_score is None:
                improved = True
            elif not math.isnan(score):
                improved = math.isnan(best_score) or (score > best_score if mode == "max" else score < best_score)
            else:
                improved = False
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
                            **({f"val_{monitor}": f"{score:.4f}"} if monitor is not None else {}))
        if ckdir is not None and main:
            if not os.path.isdir(ckdir):  # created lazily: a run failing early leaves nothing
                from graphmil.train.config import dump_config
                make_run_dir(run_dir)
                os.makedirs(ckdir)
                dump_config(cfg, os.path.join(run_dir, "config.yaml"))
            state = dict(best_score=best_score, best_epoch=best_epoch, bad_epochs=bad_epochs,
                         history=history, rng=_rng_state(), model_spec=model_spec, monitor=monitor)
            if improved:
                save_checkpoint(os.path.join(ckdir, "best.pt"), model, optimizer, scheduler,
                                epoch + 1, cfg, **state)
            # last.pt last: once it says epoch e, everything of epoch e is on disk
            if writer is None:
                writer = HistoryWriter(os.path.join(run_dir, "history.csv"))
            writer.append(row)
            save_checkpoint(os.path.join(ckdir, "last.pt"), model, optimizer, scheduler,
                            epoch + 1, cfg, **state)
        stop = (cfg.patience is not None and monitor is not None and bad_epochs >= cfg.patience
                and epoch + 1 >= cfg.min_epochs)
        if stop:
            break
    bar.close()
    epochs_run = len(history)

    if info.is_distributed:
        torch.distributed.barrier()
    restored = "last"
    if monitor is not None and cfg.restore_best and history and best_epoch != history[-1]["epoch"]:
        restored = "best"
        if ckdir is not None:
            load_model_state(model, read_checkpoint(os.path.join(ckdir, "best.pt"), device)["model"])
        elif best_state is not None:
            model.load_state_dict(best_state)
    elif monitor is not None and cfg.restore_best:
        restored = "best"  # the best epoch is the last one
    result = FitResult(model=model, history=history, best_epoch=int(best_epoch),
                       best_score=float("nan") if best_score is None else float(best_score),
                       epochs_run=epochs_run, monitor=monitor, run_dir=run_dir)
    if run_dir is not None:
        result.checkpoints = {"best": os.path.join(ckdir, "best.pt"), "last": os.path.join(ckdir, "last.pt")}
        if main:
            tmp = os.path.join(run_dir, "fit.json.tmp")
            with open(tmp, "w") as f:
                json.dump({"best_epoch": result.best_epoch, "best_score": result.best_score,
                           "monitor": monitor, "monitor_asked": cfg.monitor, "monitor_note": why,
                           "restored": restored, "epochs_run": epochs_run,
                           "model_spec": model_spec}, f, indent=2, default=str)
            os.replace(tmp, os.path.join(run_dir, "fit.json"))
    return result
