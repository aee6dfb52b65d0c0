#!/usr/bin/env bash
# Installs uv if missing and syncs the locked environment (CPU extra unless SEGR1_EXTRA says cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v uv >/dev/null 2>&1; then
    python3 -m pip install --quiet "uv==0.13.9"
fi
uv sync --locked --extra "${SEGR1_EXTRA:-cpu}"
