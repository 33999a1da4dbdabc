"""Datasets: feature folders, synthetic spatial bags, classic MIL sets, colon-cancer bags."""

from graphmil._lazy import lazy_namespace

__getattr__, __dir__ = lazy_namespace(__name__, ["feature_bags", "synthetic", "classic", "colon"])
