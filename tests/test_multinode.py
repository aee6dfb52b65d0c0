"""The documented cloud layout on this machine: the driver on a head without the learner, the learner
on a node of its own (a second raylet), jobs sent with ``ray job submit``.

What one-host tests could not show: checkpoints are found and read by the learner's ranks (not on
the driver's disk), a driver killed outright is resumed from the last periodic checkpoint, and a
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


def test_a_killed_driver_resumes_on_a_cluster_from_its_last_periodic_checkpoint(head, tmp_path):
    """The driver SIGKILLed after step 3 (no final checkpoint, no export; checkpoints every 2 steps):
    ``--resume`` continues from step 2 with the learner on its own node, step 3 is done again once,
    and the metrics hold each of the 4 steps once."""
    node = start_ray_node(head, num_cpus=1, resources={"learner_node": 1})
    try:
        run = tmp_path / "run"
        job = [*TINY_JOB, "--trainer.checkpoint_every", "2", "--trainer.output_dir", str(run), "--trainer.steps", "4",
               "--resume"]
        submitted = head.job_cli(["submit", "--no-wait", "--submission-id", "killed-driver", "--runtime-env",
                                  str(RUNTIME_ENV), "--", *job])
        assert submitted.returncode == 0, output(submitted)
        deadline = time.monotonic() + 480
        while 3 not in steps_logged(run):
            assert time.monotonic() < deadline, output(head.job_cli(["logs", "killed-driver"]))
            time.sleep(0.1)
        driver_of(run).kill()  # SIGKILL: no handler runs, nothing is flushed or saved
        deadline = time.monotonic() + 120
        while "Job 'killed-driver' failed" not in (status := output(head.job_cli(["status", "killed-driver"]))):
            assert time.monotonic() < deadline, f"the job of a killed driver did not end: {status}"
            time.sleep(1)
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_2"
        assert not (run / "export").exists()
        assert learner_nodes(head) == {node_id_with(head, "learner_node")}  # not the driver's head

        again = head.submit(job, runtime_env=RUNTIME_ENV, timeout_s=600)
        assert again.returncode == 0, output(again)
        assert "resumed at step 2" in again.stdout + again.stderr, output(again)  # anywhere, not only the tail
        assert steps_logged(run) == [1, 2, 3, 4]
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_4"
        assert (run / "export" / "model.safetensors").is_file()
    finally:
        node.stop()


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
