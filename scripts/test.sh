#!/usr/bin/env bash
# The README's test command: set up the environment, then run the whole suite.
# pytest's exit 5 ("no tests collected") means the suite is broken or empty: fail loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# The web page's test drives the system's Chromium through Playwright (Playwright's own browser
# download needs a network CI does not have); Debian's package, installed when missing.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
        apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
            || { apt-get update >/dev/null && apt-get install -y --no-install-recommends chromium >/dev/null; }
    else
        echo "scripts/test.sh: no Chromium, and no root apt-get to install it: the web page's test will be skipped" >&2
    fi
fi
# The venv's python, not `uv run`: under `uv run` Ray ships the current directory (the 6.5 GB
# .venv included) to every worker as its working_dir, which fills the disk.
export RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treating as a failure" >&2
    exit 1
fi
exit "$status"
