"""``python -m kodarelay``: the same command as ``kodarelay``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
