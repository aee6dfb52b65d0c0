"""Trainer checks that need no job (the loop itself runs in test_run.py)."""

from __future__ import annotations

import pytest

from segr1.config import load_config
from segr1.train.trainer import Trainer


def test_evaluate_without_held_out_prompts_says_what_to_set(tmp_path):
    # No pipeline, learner or source: evaluate() must refuse before it touches any of them,
    # rather than report the NaN mean of nothing.
    trainer = Trainer(load_config("tiny"), None, None, None, None, [], None, tmp_path, fetch=None)
    with pytest.raises(ValueError, match=r"no held-out prompts .* data.eval .* trainer.eval_every > 0"):
        trainer.evaluate()


class _Restores:
    """The learner, weight sync and prompt source as ``resume`` sees them, holding one checkpoint."""

    def __init__(self, state):
        self.state, self.pushed, self.data, self.weight_version = state, [], None, 0

    def load_checkpoint(self, _root):
        if self.state:  # as LearnerGroup does: the checkpoint's weight version becomes the learner's
            self.weight_version = self.state["weight_version"]
        return self.state

    @property
    def version(self):
        return self.weight_version

    def push(self, new=True):
        self.weight_version += int(new)
        self.pushed.append(self.weight_version)
        return self.weight_version

    def load_state_dict(self, data):
        self.data = data


@pytest.mark.parametrize(("state", "kept"), [({"step": 4, "weight_version": 4, "data": {"position": 32}}, 4),
                                             (None, 0)])
def test_resume_cuts_the_logs_back_to_the_checkpoint(tmp_path, state, kept):
    import json

    from segr1.train.monitor import Monitor

    monitor = Monitor(tmp_path, total_steps=10, ray_metrics=False)
    for step in range(1, 8):  # the stopped run got to step 7
        monitor.log_step(step, {"loss": float(step)})
    restores = _Restores(state)
    trainer = Trainer(load_config("tiny"), None, restores, restores, restores, [], monitor, tmp_path, fetch=None)
    assert trainer.resume() == (state is not None)
    monitor.close()
    assert trainer.step == kept and trainer.version == kept and restores.pushed == ([4] if state else [])
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, kept + 1))
