"""graphmil: multiple-instance learning on whole-slide images as PyTorch Geometric graphs.

A slide is a *bag*: a :class:`torch_geometric.data.Data` with patch features ``x``, level-0
coordinates ``pos`` and a spatial ``edge_index``.  A batch of bags is a PyG
:class:`~torch_geometric.data.Batch` (instances concatenated, ``batch``/``ptr`` index, block-diagonal
edges) and every layer of graphmil works on that shape without padding.
"""

__version__ = "0.1.0"

from graphmil.data import make_bag  # noqa: E402,F401

__all__ = ["make_bag", "__version__"]
