"""The paper's stages as one chain on the tiny models: prerl -> cod -> sod -> eval, each stage
starting from the previous stage's export, exactly where the presets point (``runs/prerl/export``,
``runs/cod/export``), from a working directory the Ray workers do not share.

What a real chain meets that single-stage tests never did: a relative ``trainer.output_dir`` that
names another folder in the learner's process than in the driver's, an export that must carry the
run's image bounds for the next stage and for evaluation, and weights that must survive the trip
through safetensors bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from actors.rollout import SamplingSettings
from learner.inputs import PromptCache, collate, completion_logits, load_processor, Sampled
from segr1.config import load_config
from segr1.core.frames import processor_bounds
from segr1.core.schema import SampleScore, ScoredGroup, train_samples
from segr1.evaluation.results import RECORDS_FILE
from segr1.train.job import build_job

pytestmark = pytest.mark.slow

STAGES = ("prerl", "cod", "sod")
TINY_BOUNDS = (3136, 12544)  # the tiny preset's model.min_pixels / max_pixels
EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja")
LOGPROB_TOL = 1e-4  # float32 learner vs float32 reload: measured ~1e-6


def stage_config(preset: str):
    """The tiny job as ``preset``'s stage: its model (the previous export), task and output dir."""
    stage = load_config(preset)
    model = "tiny" if preset == "prerl" else stage.model.path
    return load_config("tiny", [
        "--model.path", model, "--data.task", stage.data.task, "--trainer.output_dir", stage.trainer.output_dir,
        "--trainer.steps", "2", "--trainer.eval_every", "0", "--trainer.checkpoint_every", "0",
        "--grpo.entropy_coef", "0.5", "--learner.lr", "1e-3",  # every step moves the weights
        "--rollout.max_tokens", "48",  # the random policy's answers never end: keep them short
    ])


def test_presets_chain_through_their_exports():
    assert load_config("cod").model.path == load_config("prerl").trainer.output_dir + "/export"
    assert load_config("sod").model.path == load_config("cod").trainer.output_dir + "/export"


def _learner_logprobs_of_fresh_rollouts(job) -> tuple[list, list[list[float]]]:
    items = [p.item for p in job.trainer.source.next(2)]
    groups = job.rollout.generate(items, SamplingSettings(n=2, max_tokens=16, seed=5))
    samples = []
    for group in groups:
        scored = ScoredGroup(group, [SampleScore(0.0, {}) for _ in group.completions])
        samples.extend(train_samples(scored, [0.0] * len(group.completions)))
    return samples, job.learner.compute_logprobs(samples)


def _export_logprobs(export: Path, samples) -> list[list[float]]:
    from transformers import AutoModelForImageTextToText

    processor = load_processor(str(export))  # the bounds the export carries, nothing passed
    model = AutoModelForImageTextToText.from_pretrained(export, dtype=torch.float32).eval()
    cache = PromptCache(processor)
    batch = collate(samples, [cache.get(s) for s in samples], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logp = Sampled.of(processor, model.config).logprobs(completion_logits(model, batch), batch.completion_ids)
    return [logp[i, : len(s.completion_ids)].tolist() for i, s in enumerate(samples)]


def test_prerl_cod_sod_eval_chain(ray_cluster, tmp_path, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)  # the presets' relative paths: runs/prerl, runs/cod, runs/sod
    assert os.getcwd() != ray.get(ray.remote(lambda: os.getcwd()).remote())  # workers run elsewhere
    for preset in STAGES:
        config = stage_config(preset)
        job = build_job(config, config.trainer.output_dir)
        try:
            job.trainer.fit()
            if preset == STAGES[-1]:
                samples, learner_logprobs = _learner_logprobs_of_fresh_rollouts(job)
        finally:
            job.shutdown()
        run = tmp_path / "runs" / preset
        export = run / "export"
        for name in EXPORT_FILES:
            assert (export / name).is_file(), (preset, name)
        bounds = processor_bounds(load_processor(str(export)))  # as the next stage loads it
        assert (bounds.min_pixels, bounds.max_pixels) == TINY_BOUNDS
        used = (run / "config.yaml").read_text()
        assert f"output_dir: {run}" in used  # made absolute on the driver
        if preset != "prerl":
            assert f"path: {tmp_path / 'runs' / STAGES[STAGES.index(preset) - 1] / 'export'}" in used
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_2"

    # The last export holds the learner's final weights: same log-probs after the reload.
    reloaded = _export_logprobs(tmp_path / "runs" / "sod" / "export", samples)
    for theirs, ours in zip(learner_logprobs, reloaded):
        assert max(abs(a - b) for a, b in zip(theirs, ours)) < LOGPROB_TOL

    from segr1.eval import main

    status = main([
        "--policy", "runs/sod/export", "--sam2-checkpoint", "tiny", "--out", "results/sod",
        "--benchmark", "shards:runs/sod/data/synthetic-eval:sod", "--policy-size", "112",
        "--max-tokens", "24", "--dtype", "float32", "--max-model-len", "1024", "--kv-cache-mb", "128",
        "--no-progress", "--gallery", "0",
    ])
    assert status == 0
    (records_file,) = (tmp_path / "results" / "sod").glob(f"*/{RECORDS_FILE}")
    records = [json.loads(line) for line in records_file.read_text().splitlines()]
    assert len(records) == 4
    assert all(r["policy_size"] == [112, 112] for r in records)  # 112 within the export's bounds stays 112
