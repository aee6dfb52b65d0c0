#!/usr/bin/env bash
# The README's run command: set up the environment, then run the default job (preset tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec uv run --locked --extra "${SEGR1_EXTRA:-cpu}" python -m segr1.run "$@"
