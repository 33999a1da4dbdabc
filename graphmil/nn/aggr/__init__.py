"""Attention pools as PyG aggregations."""

from graphmil.nn.aggr.base import AttentionPool, PoolOutput
from graphmil.nn.aggr.attention import AttentionAggregation

__all__ = ["AttentionPool", "PoolOutput", "AttentionAggregation"]
