"""The package's layers hold: import-linter's contracts in pyproject.toml, checked on every run.

core (pure: no Ray, vLLM, DeepSpeed or transformers) <- data, segmenters, weightsync, runtime,
testing <- actors, learner (independent of each other) <- config <- train, evaluation, serving
<- entry points.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTRACTS = 3


def test_import_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"Contracts: {CONTRACTS} kept, 0 broken." in result.stdout
