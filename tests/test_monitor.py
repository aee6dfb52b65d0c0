"""The job's logs: a resumed run writes every step once, to metrics.jsonl and to TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from segr1.train.monitor import Monitor


def _log_steps(monitor: Monitor, steps: range, loss: float) -> None:
    for step in steps:
        monitor.log_step(step, {"loss": loss + step, "reward": 0.5})
        if step % 2 == 0:  # an eval record of the same step, as the trainer logs it
            monitor.log_step(step, {"eval_reward": loss}, advance=False)


def _tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_resumed_run_logs_each_step_once(tmp_path):
    first = Monitor(tmp_path, total_steps=7, ray_metrics=False)
    _log_steps(first, range(1, 8), loss=0.0)
    first.close()  # the driver dies after step 7; the newest checkpoint is of step 4
    time.sleep(1.1)  # TensorBoard orders event files by their names' whole-second time stamp

    resumed = Monitor(tmp_path, total_steps=7, ray_metrics=False)
    resumed.resume_at(4)
    _log_steps(resumed, range(5, 8), loss=100.0)
    resumed.close()

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["loss"] for r in train] == [1.0, 2.0, 3.0, 4.0, 105.0, 106.0, 107.0]  # 5..7 from the resumed run
    assert [(r["step"], r["eval_reward"]) for r in records if "eval_reward" in r] == [
        (2, 0.0), (4, 0.0), (6, 100.0)
    ]
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0), (6, 106.0), (7, 107.0)]
    assert [s for s, _ in scalars["reward"]] == [1, 2, 3, 4, 5, 6, 7]
    assert scalars["eval_reward"] == [(2, 0.0), (4, 0.0), (6, 100.0)]


def test_resume_drops_a_torn_last_line_and_refuses_a_foreign_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')  # killed mid-write
    monitor = Monitor(tmp_path, total_steps=3, ray_metrics=False)
    monitor.resume_at(2)
    monitor.log_step(3, {"loss": 3.5})
    monitor.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]

    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    monitor = Monitor(tmp_path, total_steps=3, ray_metrics=False)
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a metrics record"):
        monitor.resume_at(1)
