"""SFT warm start: the targets it writes, and the CLI lowering the answer loss on the tiny policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from segr1.core.parser import parse_completion
from segr1.core.prompts import answer_format
from segr1.train.sft import answer_for_mask, random_answer, sft_samples


def _mask() -> np.ndarray:
    mask = np.zeros((60, 80), bool)
    mask[10:30, 20:50] = True
    mask[10:15, 20:25] = False  # a notch, so the box holds background too
    return mask


def test_answer_for_mask_reads_back_as_the_mask_box_and_points():
    mask = _mask()
    text = answer_for_mask(mask, "cod", np.random.default_rng(0), (80, 60))
    parsed = parse_completion(text, (80, 60))
    assert parsed.complete(answer_format("cod")) and not parsed.errors
    assert parsed.boxes.tolist() == [[20, 10, 49, 29]]
    labels = parsed.labels.tolist()
    assert labels.count(1) == 2 and labels.count(0) == 1
    for (x, y), label in zip(parsed.points.astype(int), labels):
        assert mask[y, x] == bool(label)  # positives on the object, the negative beside it
    assert 20 <= parsed.points[labels.index(0)][0] <= 49  # the negative point lies inside the box


def test_pre_rl_answers_have_no_box_and_empty_masks_none():
    text = answer_for_mask(_mask(), "dis", np.random.default_rng(0), (80, 60))
    assert "<bbox>" not in text and "<think>" not in text
    assert parse_completion(text, (80, 60)).complete(answer_format("dis"))
    assert answer_for_mask(np.zeros((8, 8), bool), "cod", np.random.default_rng(0), (8, 8)) is None


def test_answers_are_scaled_into_the_policys_frame():
    """The policy sees the 80x60 mask's image at 160x30: x doubles, y halves, box and points alike."""
    same = parse_completion(answer_for_mask(_mask(), "cod", np.random.default_rng(0), (80, 60)), (80, 60))
    scaled = parse_completion(answer_for_mask(_mask(), "cod", np.random.default_rng(0), (160, 30)), (160, 30))
    assert scaled.boxes.tolist() == [[40, 5, 98, 14]]  # [20, 10, 49, 29] x (2, 0.5), rounded half to even
    assert np.abs(scaled.points - same.points * [2, 0.5]).max() <= 0.5


def test_random_answers_keep_the_format_inside_the_image():
    for seed in range(20):
        text = random_answer((80, 60), "cod", np.random.default_rng(seed))
        parsed = parse_completion(text, (80, 60))
        assert parsed.complete(answer_format("cod")) and not parsed.errors, text
        assert 1 in parsed.labels.tolist()


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    from segr1.data.synth import write_synth

    path = tmp_path_factory.mktemp("sft") / "data"
    write_synth(path, count=4, size=112, seed=0)
    return path


def test_sft_samples_end_the_turn_and_repeat_per_record(tiny_qwen_dir, sft_data):
    from transformers import AutoProcessor

    from segr1.data.reader import ShardReader

    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    first = list(sft_samples(iter(ShardReader(sft_data, shuffle=False, epochs=1)), processor, False, seed=0))
    again = list(sft_samples(iter(ShardReader(sft_data, shuffle=False, epochs=1)), processor, False, seed=0))
    assert len(first) == 4 and [s.completion_ids for s in first] == [s.completion_ids for s in again]
    for sample in first:
        assert sample.completion_ids[-1] == processor.tokenizer.eos_token_id
        assert processor.image_token in sample.prompt
        text = processor.tokenizer.decode(sample.completion_ids[:-1])
        assert parse_completion(text, (112, 112)).complete(answer_format("cod"))


def _answer_nll(model_dir: Path, samples) -> float:
    """Mean negative log-likelihood of the answer tokens under the model in ``model_dir``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from learner.inputs import PromptCache, Sampled, collate, completion_logits

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    cache = PromptCache(processor)
    batch = collate(samples, [cache.get(s) for s in samples], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logp = Sampled.of(processor, model.config).logprobs(completion_logits(model, batch), batch.completion_ids)
    return float(-(logp * batch.completion_mask).sum() / batch.completion_mask.sum())


def _run_sft(*args: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, "-m", "segr1.sft", *args], capture_output=True, text=True, timeout=900, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_sft_cli_lowers_answer_loss_resumes_and_exports(tiny_qwen_dir, sft_data, tmp_path):
    from transformers import AutoProcessor

    from segr1.data.reader import ShardReader

    common = ["--model", str(tiny_qwen_dir), "--data", str(sft_data), "--output", str(tmp_path / "ckpt"),
              "--batch-size", "4", "--micro-batch-size", "2", "--lr", "3e-3", "--zero-stage", "1",
              "--dtype", "bfloat16", "--seed", "0"]
    first = _run_sft(*common, "--steps", "8")
    assert [r["step"] for r in first if "step" in r] == list(range(1, 9))
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_8"
    state = json.loads((tmp_path / "ckpt" / "step_8" / "client_state.json").read_text())
    assert state["step"] == 8 and state["data"]["epoch"] * 4 + state["data"]["position"] == 32  # records used

    second = _run_sft(*common, "--steps", "12", "--resume", "--export", str(tmp_path / "export"))
    steps = [r for r in second if "step" in r]
    assert [r["step"] for r in steps] == [9, 10, 11, 12]  # continued, not restarted
    assert steps[-1]["loss"] < 0.6 * first[0]["loss"]

    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    samples = list(sft_samples(iter(ShardReader(sft_data, shuffle=False, epochs=1)), processor, False, seed=0))
    before = _answer_nll(tiny_qwen_dir, samples)
    after = _answer_nll(tmp_path / "export", samples)
    assert after < 0.6 * before, (before, after)
