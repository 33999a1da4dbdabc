"""Readers and writers for CLAM, TRIDENT and graphmil's own bag files; score export (h5, QuPath GeoJSON, CSV)."""

from graphmil._lazy import lazy_namespace

__getattr__, __dir__ = lazy_namespace(__name__, ["readers", "writers", "folders", "synthetic_folder", "geojson"])
