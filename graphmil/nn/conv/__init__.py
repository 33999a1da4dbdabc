"""Message-passing layers: the Sm smooth operator."""

from graphmil._lazy import lazy_namespace

__getattr__, __dir__ = lazy_namespace(__name__, ["sm"])
