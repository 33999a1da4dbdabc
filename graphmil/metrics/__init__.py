"""graphmil.metrics."""
