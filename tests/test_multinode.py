"""The documented cloud layout on this machine: the driver on a head without the learner, the learner
on a node of its own (a second raylet), jobs sent with ``ray job submit``.

What one-host tests could not show: checkpoints are found and read by the learner's ranks (not on
the driver's disk), a driver killed outright is resumed from the last periodic checkpoint, a job
stopped with ``ray job stop`` saves before it ends and resumes from there, and a
``trainer.output_dir`` the learner's node cannot see stops the job at start-up with a message
naming it, instead of training for a day and losing every checkpoint. The "cannot see" node runs in
a private mount namespace with an empty tmpfs over the run's folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from ray_head import REPO, RayHead, start_ray_head, start_ray_node

pytestmark = pytest.mark.slow

RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"
TINY_JOB = ["python", "-m", "segr1.run", "--trainer.eval_every", "0", "--trainer.checkpoint_every", "1",
            "--rollout.num_cpus_per_actor", "0.5", "--reward.num_cpus_per_actor", "0.5",
            "--model.path", "tiny", "--rollout.max_tokens", "48"]  # plumbing, not learning: the random policy


@pytest.fixture(scope="module")
def head() -> Iterator[RayHead]:
    started = start_ray_head(num_cpus=2, resources={"rollout_node": 1, "reward_node": 1})
    yield started
    started.stop()


def output(result) -> str:
    return (result.stdout + result.stderr)[-6000:]


def steps_logged(run: Path) -> list[int]:
    """The training steps in the run's metrics (read while the job writes: a torn last line is left out)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return [record["step"] for record in records if "reward" in record]


def learner_nodes(head: RayHead) -> set[str]:
    """Node ids the job's learner ranks ran on (the state API lists dead actors too)."""
    status, body = head.http_get("/api/v0/actors?limit=1000&detail=true")
    assert status == 200, body
    actors = json.loads(body)["data"]["result"]["result"]
    return {a["node_id"] for a in actors if (a.get("name") or "").startswith("learner-")}


def node_id_with(head: RayHead, resource: str) -> str:
    status, body = head.http_get("/api/v0/nodes?limit=100&detail=true")
    assert status == 200, body
    nodes = json.loads(body)["data"]["result"]["result"]
    (node,) = [n for n in nodes if resource in n["resources_total"] and n["state"] == "ALIVE"]
    return node["node_id"]


def driver_of(run: Path) -> psutil.Process:
    """The job's driver: the process running segr1.run for ``run`` (a child of Ray's job supervisor)."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "segr1.run" in cmdline and str(run) in cmdline:
            return proc
    raise AssertionError(f"no driver process runs segr1.run for {run}")


def test_a_killed_driver_resumes_from_its_last_periodic_checkpoint_and_a_stopped_one_saves_first(head, tmp_path):
    """With the learner on a node of its own, as a user drives it with ``ray job submit``:

    1. the driver SIGKILLed after step 3 (checkpoints every 2 steps): no final checkpoint, no export;
    2. ``--resume`` continues from step 2; ``ray job stop`` after its step 5 lets the driver finish
       its step, checkpoint and export (SIGTERM, given time by cluster/runtime_env.yaml);
    3. ``--resume`` once more finishes the run: every step is in the metrics once, and the console
       holds segr1's lines while the roles' output, the learner's from its node too, is in logs/.
    """
    node = start_ray_node(head, num_cpus=1, resources={"learner_node": 1})
    try:
        run = tmp_path / "run"
        job = [*TINY_JOB, "--trainer.checkpoint_every", "2", "--trainer.output_dir", str(run), "--resume"]
        submit(head, "killed", [*job, "--trainer.steps", "40"])
        wait_until(head, "killed", lambda: 3 in steps_logged(run))
        driver_of(run).kill()  # SIGKILL: no handler runs, nothing is flushed or saved
        wait_until(head, "killed", lambda: job_state(head, "killed") == "failed", timeout_s=120, every_s=2)
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_2"
        assert not (run / "export").exists()
        assert learner_nodes(head) == {node_id_with(head, "learner_node")}  # not the driver's head

        submit(head, "stopped", [*job, "--trainer.steps", "40"])
        wait_until(head, "stopped", lambda: 5 in steps_logged(run))
        assert head.job_cli(["stop", "stopped"]).returncode == 0
        wait_until(head, "stopped", lambda: (run / "export" / "model.safetensors").exists())  # after its checkpoint
        done = steps_logged(run)[-1]
        assert done < 40 and (run / "checkpoints" / "latest").read_text().strip() == f"step_{done}"
        assert "resumed at step 2" in head.job_cli(["logs", "stopped"]).stdout

        again = head.submit([*job, "--trainer.steps", str(done + 1)], runtime_env=RUNTIME_ENV, timeout_s=600)
        assert again.returncode == 0, output(again)
        assert f"resumed at step {done}" in again.stdout + again.stderr, output(again)  # anywhere, not only the tail
        assert steps_logged(run) == list(range(1, done + 2))
        assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{done + 1}"
        check_console(again.stdout + again.stderr, run)
    finally:
        node.stop()


def submit(head: RayHead, job_id: str, entrypoint: list[str]) -> None:
    submitted = head.job_cli(["submit", "--no-wait", "--submission-id", job_id, "--runtime-env", str(RUNTIME_ENV),
                              "--", *entrypoint])
    assert submitted.returncode == 0, output(submitted)


def job_state(head: RayHead, job_id: str) -> str:
    """``running``, ``succeeded``, ``failed`` or ``stopped``, from ``ray job status``."""
    text = output(head.job_cli(["status", job_id]))  # where the CLI prints it depends on the terminal
    return next((state for state in ("succeeded", "failed", "stopped") if f"Job '{job_id}' {state}" in text), "running")


def wait_until(head: RayHead, job_id: str, ready, timeout_s: float = 480, every_s: float = 0.1) -> None:
    """Until ``ready()``, or fail with the job's log (a ``ready`` that asks the CLI, a core-second
    each time, wants a longer ``every_s``)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, output(head.job_cli(["logs", job_id]))
        time.sleep(every_s)


# What the roles print that the console must not show (it goes to <run>/logs): vLLM's engine
# arguments, DeepSpeed's accelerator note, and what used to repeat: the processor's deprecated
# min/max_pixels warning, vLLM's set_num_threads warning and its reload's "Failed to load weights".
CHATTER = ("non-default args", "Setting accelerator to CPU", "set_num_threads", "Failed to load weights",
           "Passing `min_pixels` and `max_pixels`")


def check_console(console: str, out: Path) -> None:
    """segr1's lines and the run's summary on the console; the roles' output in files under logs/."""
    assert "run summary:" in console and "reward:" in console and str(out / "export") in console
    shown = [text for text in CHATTER if text in console]
    assert shown == [], console[-4000:]
    logs = {path.name: path.read_text() for path in (out / "logs").glob("*.log")}
    rollout = [text for name, text in logs.items() if name.startswith("RolloutActor-")]
    assert rollout and all("non-default args" in text for text in rollout), sorted(logs)
    assert any(name.startswith("LearnerWorker-") and "Setting accelerator to CPU" in text for name, text in logs.items())
    assert all(text.count("set_num_threads") <= 1 for text in rollout)  # vLLM's repeats are dropped at the source
    assert not any("Failed to load weights" in text or "Passing `min_pixels`" in text for text in logs.values())
    assert "resumed at step" in logs["driver.log"] and (out / "reward_curve.png").is_file()


def test_an_output_dir_the_learner_cannot_see_stops_the_job_at_start(head, tmp_path):
    private = tmp_path / "private"  # mounted over by an empty tmpfs on the learner's node only
    node = start_ray_node(head, num_cpus=1, resources={"learner_node": 1}, hide=private)
    try:
        run = private / "run"
        result = head.submit([*TINY_JOB, "--trainer.output_dir", str(run), "--trainer.steps", "2"],
                             runtime_env=RUNTIME_ENV, timeout_s=600)
    finally:
        node.stop()
    text = output(result)
    assert result.returncode != 0
    assert f"trainer.output_dir {run}: learner rank 0 on node" in text
    assert "shares (NFS, EFS, Filestore)" in text
    assert "step 1" not in text  # nothing trained
    assert not (run / "checkpoints").exists()
