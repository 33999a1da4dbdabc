"""graphmil.transforms."""
