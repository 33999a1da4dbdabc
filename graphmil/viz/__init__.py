"""Attention heatmaps, heatmaps over the whole-slide image, and the run report."""

from graphmil._lazy import lazy_namespace

__getattr__, __dir__ = lazy_namespace(__name__, ["heatmap", "overlay", "report"])
