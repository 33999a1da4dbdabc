"""PyG transforms: spatial graphs, edge weights, region partitions, subsampling."""

from graphmil._lazy import lazy_namespace

__getattr__, __dir__ = lazy_namespace(__name__, ["graph", "subsample", "regions"])
