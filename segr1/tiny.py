"""``python -m segr1.tiny`` / ``segr1 tiny``: build (or find) the tiny models (``segr1.testing.tiny``)."""

from __future__ import annotations

import sys

from segr1.testing.tiny import main

if __name__ == "__main__":
    sys.exit(main())
