"""``python -m fastmat``: the same as the ``fastmat`` command."""

from __future__ import annotations

import sys

from fastmat.cli import main

if __name__ == "__main__":
    sys.exit(main())
