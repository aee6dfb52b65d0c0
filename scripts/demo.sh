#!/usr/bin/env bash
# The README's run command: set up the environment, then run the default job (preset tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# The venv's python, not `uv run`: under `uv run` Ray ships the current directory (the 6.5 GB
# .venv included) to every worker as its working_dir.
export RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
exec .venv/bin/python -m segr1.run "$@"
