"""graphmil.nn.conv."""
