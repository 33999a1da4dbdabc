"""Bag data model and splits."""

from graphmil.data.bag import make_bag, validate_bag

__all__ = ["make_bag", "validate_bag"]
