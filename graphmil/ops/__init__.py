"""Low-level operations under ``graphmil.nn`` and ``graphmil.transforms``: geometry (grid step,
lattice / k-NN / radius edges), region partitions, instance masks, batch bookkeeping."""

from graphmil._lazy import lazy_namespace

__getattr__, __dir__ = lazy_namespace(__name__, ["geometry", "partition", "masking", "batching"])
