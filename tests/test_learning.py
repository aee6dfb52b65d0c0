"""The real loop learns: vLLM engine, DeepSpeed learner, weight push, GRPO, from the format-warm tiny policy.

The tiny policy after its short SFT (``tiny-warm``) writes a well-formed answer about half the time,
at random places. Over a few dozen steps GRPO must raise the mean reward clearly. The margin is set
so that the loop broken in any of the three ways that leave a run looking healthy fails it (each
checked by hand, see the note in docs/training.md): the policy-gradient sign flipped (the reward
falls), the weight push skipped (the engines keep sampling the warm start: flat), and the
advantages shuffled within the batch (no information about which answer was better: flat). The box
segmenter makes each reward a deterministic function of the answer, and every seed is fixed, so a
run repeats on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segr1.config import load_config
from segr1.train.job import build_job

pytestmark = pytest.mark.slow

STEPS = 40
WINDOW = 8  # steps averaged at each end
LEARNING = [
    "--model.path", "tiny-warm", "--sam2.backend", "box", "--rollout.group_size", "8",
    "--trainer.prompts_per_step", "4", "--trainer.steps", str(STEPS), "--learner.lr", "3e-4",
    "--learner.micro_batch_size", "32", "--trainer.eval_every", "0", "--trainer.sample_every", "0",
    "--trainer.checkpoint_every", "0",
]
MARGIN = 0.15  # reward is format (0 or 1) + 0.7 IoU + 0.3 S-measure, at most 2


def rewards(out_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["reward"] for line in lines if "reward" in line]


def test_grpo_raises_the_reward_of_the_format_warm_policy(ray_cluster, tmp_path):
    job = build_job(load_config("tiny", [*LEARNING, "--trainer.output_dir", str(tmp_path)]), tmp_path)
    try:
        job.trainer.fit()
    finally:
        job.shutdown()
    curve = rewards(tmp_path)
    assert len(curve) == STEPS
    first, last = float(np.mean(curve[:WINDOW])), float(np.mean(curve[-WINDOW:]))
    assert last - first > MARGIN, f"reward {first:.3f} -> {last:.3f}: {[round(r, 2) for r in curve]}"
