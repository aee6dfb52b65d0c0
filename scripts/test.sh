#!/usr/bin/env bash
# The README's test command: set up the environment, then run the whole suite.
# pytest's exit 5 ("no tests collected") means the suite is broken or empty: fail loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
set +e
uv run --locked --extra "${SEGR1_EXTRA:-cpu}" pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treating as a failure" >&2
    exit 1
fi
exit "$status"
