"""Training configuration: dataclasses loaded from / dumped to YAML, with strict key checking."""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Union

__all__ = ["TrainConfig", "ModelConfig", "DataConfig", "CVConfig", "ExperimentConfig",
           "load_config", "dump_config", "config_from_dict", "MONITORS"]


#: validation metrics ``TrainConfig.monitor`` may name (keys of :func:`graphmil.train.evaluate`)
MONITORS = ("loss", "auroc", "accuracy", "f1", "precision", "recall", "instance_auroc", "instance_auroc_sm",
            "instance_auroc_per_bag", "entropy_mean", "entropy_norm_mean", "auroc_minus_loss")


@dataclass
class TrainConfig:
    """How one model is fitted (:func:`graphmil.train.fit`).

    Args:
        epochs (int): number of epochs (default ``20``).
        batch_size (int): bags per optimisation step and per process (default ``8``; the papers
            use ``1``, which is slow and noisy; graphmil batches uneven bags without padding).
        lr (float): learning rate (default ``1e-4``).
        weight_decay (float): weight decay (default ``1e-5``).
        optimizer (str): ``"adam"`` or ``"adamw"`` (default ``"adamw"``).
        scheduler (str): ``"none"``, ``"cosine"`` (cosine decay to ``min_lr_factor · lr`` over the
            epochs after warm-up) or ``"constant"`` (default ``"cosine"``). Schedules step per epoch.
        warmup_epochs (int): linear warm-up epochs from ``warmup_start_factor · lr`` (default ``0``).
        warmup_start_factor (float): default ``0.1`` (the Sm recipe).
        min_lr_factor (float): cosine floor as a fraction of ``lr`` (default ``0.0``).
        class_weights: ``None`` (default), ``"balanced"`` (from the training labels) or a list of
            ``C`` weights (``[w_0, w_1]`` for a binary task gives ``pos_weight = w_1 / w_0``).
        aem_lambda (float): weight ``λ`` of the AEM attention-entropy term (default ``0.0``: off).
        aem_normalize (bool): divide the entropy by ``log N_b`` (default ``False``).
        monitor (str): validation metric for early stopping / best checkpoint: any key of
            :func:`graphmil.train.evaluate` (``"auroc"``, ``"accuracy"``, ``"loss"``, ...) or
            ``"auroc_minus_loss"`` (the Sm recipe) (default ``"auroc"``).
        monitor_mode (str): ``"max"``, ``"min"`` or ``"auto"`` (``min`` for ``loss``) (default ``"auto"``).
        patience (int, optional): stop after this many epochs without improvement (default ``None``).
        min_epochs (int): never stop before this epoch (default ``0``).
        restore_best (bool): load the best weights at the end when a validation set is given
            (default ``True``; ``False`` keeps the last epoch, the MUSK protocol).
        grad_clip (float, optional): max gradient norm (default ``None``).
        seed (int): seed of everything (default ``0``).
        device (str): ``"cpu"``, ``"cuda"`` or ``"auto"`` (default ``"auto"``).
        num_workers (int): data-loader workers (default ``0``).
        eval_batch_size (int): bags per evaluation step (default ``16``).
        progress (bool): tqdm progress bars (default ``True``).
        ddp_find_unused_parameters (bool): passed to DDP under ``torchrun`` (default ``False``:
            every registered model uses all its parameters in each step).
        prepare (str): when :func:`graphmil.train.fit` calls ``model.prepare(train_set)``:
            ``"auto"`` (only when the model is not prepared yet: a CASii given ``keys=`` keeps
            them) or ``"always"`` (rebuild, e.g. CASii's key bank, from the training split)
            (default ``"auto"``). A resumed fit never re-prepares.
    """

    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-5
    optimizer: str = "adamw"
    scheduler: str = "cosine"
    warmup_epochs: int = 0
    warmup_start_factor: float = 0.1
    min_lr_factor: float = 0.0
    class_weights: Optional[Union[str, List[float]]] = None
    aem_lambda: float = 0.0
    aem_normalize: bool = False
    monitor: str = "auroc"
    monitor_mode: str = "auto"
    patience: Optional[int] = None
    min_epochs: int = 0
    restore_best: bool = True
    grad_clip: Optional[float] = None
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    eval_batch_size: int = 16
    progress: bool = True
    ddp_find_unused_parameters: bool = False
    prepare: str = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"TrainConfig: 'epochs' must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("TrainConfig: 'batch_size' and 'eval_batch_size' must be >= 1")
        if self.optimizer.lower() not in ("adam", "adamw"):
            raise ValueError(f"TrainConfig: 'optimizer' must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.scheduler.lower() not in ("none", "cosine", "constant"):
            raise ValueError(f"TrainConfig: 'scheduler' must be 'none', 'cosine' or 'constant', got {self.scheduler!r}")
        if self.monitor not in MONITORS:
            close = difflib.get_close_matches(str(self.monitor), MONITORS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"TrainConfig: unknown 'monitor' {self.monitor!r}.{hint} Known: {', '.join(MONITORS)}")
        if self.monitor_mode not in ("auto", "max", "min"):
            raise ValueError(f"TrainConfig: 'monitor_mode' must be 'auto', 'max' or 'min', got {self.monitor_mode!r}")
        if isinstance(self.class_weights, str) and self.class_weights != "balanced":
            raise ValueError(f"TrainConfig: 'class_weights' must be None, 'balanced' or a list, got {self.class_weights!r}")
        if self.aem_lambda < 0:
            raise ValueError(f"TrainConfig: 'aem_lambda' must be >= 0, got {self.aem_lambda}")
        if self.warmup_epochs < 0:
            raise ValueError(f"TrainConfig: 'warmup_epochs' must be >= 0, got {self.warmup_epochs}")
        if self.warmup_epochs > 0 and not 0.0 < self.warmup_start_factor <= 1.0:
            raise ValueError(f"TrainConfig: 'warmup_start_factor' must be in (0, 1], got {self.warmup_start_factor}")
        if self.prepare not in ("auto", "always"):
            raise ValueError(f"TrainConfig: 'prepare' must be 'auto' or 'always', got {self.prepare!r}")


@dataclass
class ModelConfig:
    """Which model: ``name`` from :func:`graphmil.models.list_models` and its keyword arguments."""

    name: str = "abmil"
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where the bags come from.

    Args:
        dataset (str): ``"synthetic"``, ``"musk1"``, ``"musk2"``, ``"ucsb_breast"``,
            ``"colon_cancer"`` or ``"folder"`` (a CLAM/TRIDENT/graphmil feature folder) (default
            ``"synthetic"``).
        root (str, optional): data folder (``$GRAPHMIL_DATA`` or ``../shared/data`` for named sets).
        labels (str, optional): labels CSV/TSV for ``"folder"``.
        kwargs (dict): other dataset constructor arguments.
        num_classes (int, optional): model output width (default ``None``: inferred from the
            labels, ``1`` — one logit with BCE — for two classes, ``C`` for ``C > 2``). A value
            that does not fit the labels is an error before anything is written.
    """

    dataset: str = "synthetic"
    root: Optional[str] = None
    labels: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    num_classes: Optional[int] = None


@dataclass
class CVConfig:
    """Cross-validation: ``folds`` outer folds (``1`` = a single train/test split of
    ``test_fraction``) × ``seeds``, inner validation split ``val_fraction`` of each training fold.
    Every split keeps the slides of a ``case_id`` together. ``splits`` loads explicit splits
    instead: a graphmil ``splits.csv`` or CLAM's ``splits_{k}.csv`` (a file or a folder of them)."""

    folds: int = 1
    seeds: List[int] = field(default_factory=lambda: [0])
    val_fraction: float = 0.2
    test_fraction: float = 0.25
    splits: Optional[str] = None


@dataclass
class ExperimentConfig:
    """A whole run as one YAML file: ``model``, ``data``, ``train``, ``cv`` sections and ``out``
    (the run directory; must not exist) and ``name``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    out: Optional[str] = None
    name: str = "run"


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "cv": CVConfig}


def _check_keys(cls, d: Dict[str, Any], where: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"config: '{where}' must be a mapping, got {type(d).__name__}")
    known = [f.name for f in fields(cls)]
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            path = f"{where}.{key}" if where else str(key)
            raise ValueError(f"config: unknown key '{path}'.{hint} Known keys"
                             f"{' of ' + where if where else ''}: {', '.join(known)}")


def config_from_dict(d: Optional[Dict[str, Any]], cls=ExperimentConfig):
    """Build ``cls`` (an :class:`ExperimentConfig` or a section) from a dict, refusing unknown keys
    with a message naming the key and its closest known key."""
    d = dict(d or {})
    _check_keys(cls, d, "" if cls is ExperimentConfig else cls.__name__)
    if cls is ExperimentConfig:
        kw = {}
        for k, v in d.items():
            if k in _SECTIONS:
                v = v or {}
                _check_keys(_SECTIONS[k], v, k)
                kw[k] = _SECTIONS[k](**v)
            else:
                kw[k] = v
        return ExperimentConfig(**kw)
    return cls(**d)


def load_config(path: str, cls=ExperimentConfig):
    """Read a YAML file into ``cls`` (default :class:`ExperimentConfig`). Nothing is written.

    Raises:
        ValueError: naming the file, for a missing file, invalid YAML or an unknown key.
    """
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"config file '{path}' does not exist")
    with open(path) as f:
        try:
            d = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"config file '{path}' is not valid YAML: {e}") from None
    try:
        return config_from_dict(d, cls)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def dump_config(cfg, path: Optional[str] = None) -> str:
    """YAML text of a config dataclass (written to ``path`` when given; the file must not exist)."""
    import yaml

    text = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
    if path is not None:
        with open(path, "x") as f:
            f.write(text)
    return text
