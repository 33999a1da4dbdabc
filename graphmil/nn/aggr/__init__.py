"""Attention pools as PyG aggregations."""

from graphmil._lazy import lazy_namespace
from graphmil.nn.aggr.attention import AttentionAggregation
from graphmil.nn.aggr.base import AttentionPool, PoolOutput

__getattr__, __dir__ = lazy_namespace(__name__, ["dsmil", "multibranch", "sm_attention", "casii"])
