"""Training engine: ``train_step``, ``fit``, ``predict``/``evaluate``, patient-grouped
``cross_validate`` with splits and out-of-fold predictions on disk, checkpoints and resume."""

from graphmil._lazy import lazy_namespace

__getattr__, __dir__ = lazy_namespace(
    __name__, ["config", "step", "inference", "loop", "cv", "checkpoint", "runs", "data", "distributed"])
