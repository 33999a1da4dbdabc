"""Neural-network layers of graphmil (PyG aggregations, message passing, anchors, transformers)."""
