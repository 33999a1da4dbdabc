"""``python -m graphmil`` = the ``graphmil`` command."""

import sys

from graphmil.cli import main

if __name__ == "__main__":
    sys.exit(main())
