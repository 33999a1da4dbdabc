"""Training engine: fit, evaluate, cross-validate."""

from graphmil._lazy import lazy_namespace

__getattr__, __dir__ = lazy_namespace(__name__, ["engine", "config", "distributed"])
