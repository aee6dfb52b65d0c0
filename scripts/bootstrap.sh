#!/usr/bin/env bash
# Installs uv if missing and syncs the locked environment (CPU extra unless SEGR1_EXTRA says cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v uv >/dev/null 2>&1; then
    python3 -m pip install --quiet "uv==0.13.9"
fi
# --compile-bytecode: the environment may set PYTHONDONTWRITEBYTECODE, and then every process (each Ray
# worker, vLLM engine and learner rank) would compile its imports from source again: 8 of the 14 CPU
# seconds of importing vLLM here.
uv sync --locked --extra "${SEGR1_EXTRA:-cpu}" --compile-bytecode
