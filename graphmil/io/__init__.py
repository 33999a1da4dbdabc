"""Readers and writers for CLAM, TRIDENT and graphmil's own bag files; score export."""

from graphmil._lazy import lazy_namespace

__getattr__, __dir__ = lazy_namespace(__name__, ["readers", "writers", "folders", "synthetic_folder"])
