"""``python -m segr1.sft`` / ``segr1 sft``: the SFT warm start (``segr1.train.sft``)."""

from __future__ import annotations

import sys

from segr1.train.sft import main

if __name__ == "__main__":
    sys.exit(main())
