"""Calls that hang, through the real job (tiny preset: vLLM, SAM2, DeepSpeed, Ray).

The tests' fault switch (``segr1.runtime.deadlines``, ``$SEGR1_TEST_HANG_DIR``) makes one chosen
call hang. A hung rollout or reward call must cost its deadline and a restart, not the run; a hung
weight push or learner step must stop the job with a message naming the actor and the call, and
leave the last checkpoint as it was.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

import pytest
import ray
from test_run import metric_lines, tiny_config

from actors.rollout import SamplingSettings
from segr1.core.schema import TrainSample
from segr1.run import main
from segr1.runtime.deadlines import HANG_DIR_ENV
from segr1.train.job import build_job

pytestmark = pytest.mark.slow


def switch_on(monkeypatch, folder: Path, *calls: str) -> None:
    """Hang each ``<actor>.<call>`` once; the roles started after this carry the switch."""
    folder.mkdir()
    monkeypatch.setenv(HANG_DIR_ENV, str(folder))
    for call in calls:
        (folder / call).touch()


def pid(name: str) -> int:
    return ray.get(ray.get_actor(name).__ray_call__.remote(lambda _: __import__("os").getpid()))


def test_deadline_async_run_redoes_a_hung_rollout_and_a_hung_reward_call_and_finishes(
    ray_cluster, tmp_path, monkeypatch, caplog
):
    """Both hung calls cost their deadline and a restart of their actor (an engine that must then
    rejoin the weight group), not a group and not the run."""
    caplog.set_level(logging.INFO, logger="segr1")  # the run's summary, in logs/driver.log
    switch_on(monkeypatch, tmp_path / "hangs", "rollout-0.generate", "reward-0.score_group")
    run = tmp_path / "run"
    config = tiny_config(run, "--trainer.mode", "async", "--trainer.steps", "3", "--grpo.entropy_coef", "0.5",
                         "--learner.lr", "1e-4", "--learner.lr_schedule", "cosine", "--learner.min_lr_ratio", "0.1",
                         "--rollout.call_deadline_s", "10", "--rollout.call_deadline_per_group_s", "0",
                         "--reward.call_deadline_s", "5", "--reward.call_deadline_per_group_s", "0")
    job = build_job(config, run)
    try:
        pids = {name: pid(name) for name in ("rollout-0", "reward-0")}
        job.trainer.fit()
        assert {name: pid(name) for name in pids}.items().isdisjoint(pids.items())  # both were restarted
        # The restarted engine joined the re-formed weight group: it samples with the learner's weights.
        prompt = job.trainer.source.next(1)[0].item
        (group,) = job.rollout.generate([prompt], SamplingSettings(n=2, max_tokens=16, seed=7))
        assert group.weight_version == 3
        samples = [TrainSample(group.group_id, prompt.prompt, prompt.image, c.token_ids, c.logprobs, 0.0, 3)
                   for c in group.completions]
        for completion, theirs in zip(group.completions, job.learner.compute_logprobs(samples)):
            assert max(abs(a - b) for a, b in zip(completion.logprobs, theirs)) < 1e-4
    finally:
        job.shutdown()
    assert list((tmp_path / "hangs").iterdir()) == []  # each switch fired once
    train = [line for line in metric_lines(run) if "reward" in line]
    # Every group scored once: a second score would find its prompt gone from the pipeline.
    assert [line["step"] for line in train] == [1, 2, 3]
    assert all(line["staleness"] <= 1 for line in train)
    assert train[-1]["weight_version"] == 3
    # The cosine spans the run's 3 optimizer steps: 0.1 + 0.9 x (1 + cos(pi k / 3)) / 2 of lr, k = 1..3.
    assert [line["lr"] for line in train] == pytest.approx([0.775e-4, 0.325e-4, 0.1e-4])
    assert sum(line["calls_past_deadline"] for line in train) == 2
    assert sum(line["actor_restarts"] for line in train) == 2
    redone = sum(line["groups_redone"] for line in train)
    assert redone >= 2
    summary = f"faults: 2 actor restart(s), 2 call(s) past their deadline, {redone} group(s) redone"
    assert summary in (run / "logs" / "driver.log").read_text()


def test_deadline_a_hung_weight_push_stops_the_job_and_keeps_the_last_checkpoint(
    ray_cluster, tmp_path, monkeypatch, capsys
):
    switch_on(monkeypatch, tmp_path / "hangs")
    run = tmp_path / "run"

    def hang_the_push_after_the_first_checkpoint() -> None:
        deadline = time.monotonic() + 600
        while not (run / "checkpoints" / "latest").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        (tmp_path / "hangs" / "rollout-0.receive_weights").touch()  # step 2's push; its rollouts take longer

    armer = threading.Thread(target=hang_the_push_after_the_first_checkpoint, daemon=True)
    armer.start()
    code = main(["--trainer.output_dir", str(run), "--trainer.eval_every", "0", "--model.path", "tiny",
                 "--rollout.max_tokens", "48", "--trainer.steps", "3", "--trainer.checkpoint_every", "1",
                 "--rollout.weight_sync_timeout_s", "15"])
    armer.join(5)
    err = capsys.readouterr().err
    assert code == 1
    # The learner's send waits on the hung engine; its own gloo timeout may end it first.
    assert re.search(r"segr1.run: weight push to version 2: no answer from (learner-0, )?rollout-0 within 15 s "
                     r"\(rollout.weight_sync_timeout_s\); the job stops here", err), err[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_1"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_1"]  # nothing half-written
    assert [line["step"] for line in metric_lines(run) if "reward" in line] == [1]  # a step is logged after its push
