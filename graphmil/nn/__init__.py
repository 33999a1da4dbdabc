"""Neural-network layers: pools (``aggr``), Sm (``conv``), anchors, transformers, CASii keys."""

from graphmil._lazy import lazy_namespace

__getattr__, __dir__ = lazy_namespace(__name__, ["masking", "ragged", "transformer", "casii", "anchor"])
