"""Trainer checks that need no job (the loop itself runs in test_run.py)."""

from __future__ import annotations

import pytest

from segr1.config import load_config
from segr1.trainer import Trainer


def test_evaluate_without_held_out_prompts_says_what_to_set(tmp_path):
    # No pipeline, learner or source: evaluate() must refuse before it touches any of them,
    # rather than report the NaN mean of nothing.
    trainer = Trainer(load_config("tiny"), None, None, None, None, [], None, tmp_path, fetch=None)
    with pytest.raises(ValueError, match=r"no held-out prompts .* data.eval .* trainer.eval_every > 0"):
        trainer.evaluate()
