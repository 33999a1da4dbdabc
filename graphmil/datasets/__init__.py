"""graphmil.datasets."""
