"""graphmil.train."""
