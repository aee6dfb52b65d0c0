"""`python -m segr1.data prepare|synth ...`."""

from __future__ import annotations

import sys

from segr1.data.cli import main

sys.exit(main())
