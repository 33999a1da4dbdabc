"""graphmil.losses."""
