"""Bag data model and splits."""

from graphmil._lazy import lazy_namespace
from graphmil.data.bag import make_bag, validate_bag

__getattr__, __dir__ = lazy_namespace(__name__, ["splits"])
