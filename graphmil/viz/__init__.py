"""graphmil.viz."""
