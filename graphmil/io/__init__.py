"""graphmil.io."""
