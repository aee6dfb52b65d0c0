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


# ---- the end of a run: summary and reward curve ---------------------------------------------------


def _write_metrics(path: Path, rewards: list[float], eval_every: int = 0) -> None:
    lines = []
    for step, reward in enumerate(rewards, start=1):
        lines.append({"step": step, "reward": reward, "kl": 0.01})
        if eval_every and step % eval_every == 0:
            lines.append({"step": step, "eval_reward": reward / 2})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 26, "rew')  # torn last line


def test_the_summary_says_steps_reward_trend_time_and_places(tmp_path):
    from segr1.train.summary import read_metrics, run_summary

    _write_metrics(tmp_path / "metrics.jsonl", [0.1 * (i % 5) + (0.5 if i >= 15 else 0.0) for i in range(25)])
    places = {"metrics": "/run/metrics.jsonl", "checkpoint": "/run/checkpoints/step_25", "export": "/run/export"}
    text = run_summary(read_metrics(tmp_path / "metrics.jsonl"), 25, 40, 3725.0, places, resumed_from=12)
    assert text.splitlines() == [
        "run summary: 25 of 40 steps (resumed at step 12) in 1h02m",
        "  reward: 0.2 (mean of the first 10) -> 0.7 (mean of the last 10)",
        "  faults: 0 actor restart(s), 0 call(s) past their deadline, 0 group(s) redone",
        "  metrics     /run/metrics.jsonl",
        "  checkpoint  /run/checkpoints/step_25",
        "  export      /run/export",
    ]
    faults = {"actor_restarts": 1, "calls_past_deadline": 1, "groups_redone": 2}  # step 1's, summed with step 2's
    engines = {"rollout-0": {"groups": 7, "retired": True}, "rollout-1": {"groups": 9, "retired": False}}
    short = run_summary([{"step": 1, "reward": 0.25, **faults}, {"step": 2, "reward": 0.75, "groups_redone": 3}],
                        2, 2, 12.34, {}, engines=engines)
    assert short.splitlines() == ["run summary: 2 steps in 12.3s",
                                  "  reward: 0.25 (mean of the first 1) -> 0.75 (mean of the last 1)",
                                  "  faults: 1 actor restart(s), 1 call(s) past their deadline, 5 group(s) redone",
                                  "  rollout engines (groups made): rollout-0 (gone) 7, rollout-1 9"]
    assert "no training step logged" in run_summary([], 0, 2, 65.0, {})


def test_the_reward_curve_is_drawn_from_metrics(tmp_path):
    from PIL import Image

    from segr1.train.summary import EVAL_COLOR, MEAN_COLOR, SIZE, draw_reward_curve, read_metrics, running_mean

    _write_metrics(tmp_path / "metrics.jsonl", [i / 30 for i in range(30)], eval_every=10)
    path = draw_reward_curve(read_metrics(tmp_path / "metrics.jsonl"), tmp_path / "reward_curve.png")
    picture = Image.open(path).convert("RGB")
    assert picture.size == SIZE
    colors = {color for _, color in picture.getcolors(maxcolors=SIZE[0] * SIZE[1])}
    assert MEAN_COLOR in colors and EVAL_COLOR in colors
    assert running_mean([1.0, 2.0, 3.0, 4.0], window=2) == [1.0, 1.5, 2.5, 3.5]
    assert draw_reward_curve([{"step": 1, "eval_reward": 0.5}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    single = draw_reward_curve([{"step": 3, "reward": 0.0}], tmp_path / "one.png")  # a one-step run, a flat line
    assert Image.open(single).size == SIZE


# ---- tracking: W&B offline, MLflow on a local file store --------------------------------------------


def _wandb_records(run_file: Path) -> list:
    """The records of a W&B run file (``run-<id>.wandb``): wandb's LevelDB-style log, a 7-byte
    header, then 32 KiB blocks of chunks (crc32c: 4, length: 2, type: 1 = full, 2-4 = first,
    middle, last) holding serialised ``Record`` protos."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", run_file
    records, pending, offset, block = [], b"", 7, 32768
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        length, kind = int.from_bytes(data[offset + 4 : offset + 6], "little"), data[offset + 6]
        chunk, offset = data[offset + 7 : offset + 7 + length], offset + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_a_wandb_offline_run_holds_the_config_and_every_steps_scalars(tmp_path, monkeypatch):
    from segr1.config import MonitorSettings, WandbSettings

    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    settings = MonitorSettings(wandb=WandbSettings(project="segr1-test", mode="offline", name="tiny"))
    monitor = Monitor(tmp_path, total_steps=3, ray_metrics=False, settings=settings,
                      config={"rollout": {"group_size": 4}})
    _log_steps(monitor, range(1, 4), loss=0.0)
    monitor.close()
    import wandb

    # finish() returns before wandb's service process has flushed the run file (CI read a bare
    # 7-byte header); teardown waits for it, as the interpreter's exit does at a job's end
    wandb.teardown()

    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(run_file)
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert {step: (row["loss"], row["reward"]) for step, row in history.items()} == {
        1: (1.0, 0.5), 2: (2.0, 0.5), 3: (3.0, 0.5)}, (run_file, run_file.stat().st_size, kinds)
    assert history[2]["eval_reward"] == 0.0
    updates = [u for r in records if r.WhichOneof("record_type") == "run" for u in r.run.config.update]
    updates += [u for r in records if r.WhichOneof("record_type") == "config" for u in r.config.update]
    config = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in updates}
    assert config["rollout"] == {"group_size": 4}
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)


def test_an_mlflow_run_on_a_file_store_holds_each_steps_metric_and_the_config(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from segr1.config import MlflowSettings, MonitorSettings
    from segr1.train.tracking import TrackingError

    uri = (tmp_path / "mlruns").as_uri()
    settings = MonitorSettings(mlflow=MlflowSettings(tracking_uri=uri, experiment="segr1-test", run_name="tiny"))
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(TrackingError, match=rf"monitor.mlflow \(tracking_uri {uri}, experiment 'segr1-test'\): "
                                            r"MLflow could not start a run: .*MLFLOW_ALLOW_FILE_STORE"):
        Monitor(tmp_path, total_steps=3, ray_metrics=False, settings=settings)

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.7+ keeps the file store behind this switch
    for failed in (False, True):
        monitor = Monitor(tmp_path, total_steps=3, ray_metrics=False, settings=settings,
                          config={"rollout": {"group_size": 4}, "model": {"path": "tiny"}})
        _log_steps(monitor, range(1, 4), loss=0.0)
        monitor.close(failed=failed)

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("segr1-test")
    finished, crashed = sorted(client.search_runs([experiment.experiment_id]), key=lambda r: r.info.start_time)
    assert (finished.info.status, crashed.info.status) == ("FINISHED", "FAILED")
    history = client.get_metric_history(finished.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0), (3, 3.0)]
    evals = client.get_metric_history(finished.info.run_id, "eval_reward")
    assert [(m.step, m.value) for m in evals] == [(2, 0.0)]
    assert finished.data.params == {"rollout.group_size": "4", "model.path": "tiny"}
    assert finished.info.run_name == "tiny"


def test_a_tracker_that_is_not_installed_says_what_to_install(tmp_path, monkeypatch):
    import builtins

    from segr1.config import MonitorSettings, WandbSettings

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(RuntimeError, match=r"monitor.wandb is set but wandb is not importable .*segr1\[tracking\]"):
        Monitor(tmp_path, total_steps=1, ray_metrics=False, settings=MonitorSettings(wandb=WandbSettings()))
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before anything was opened
