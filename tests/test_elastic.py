"""Elastic rollout on a local multi-node Ray cluster: engines follow the rollout nodes that come and go.

The head holds the driver, the reward actor and the learner (its markers keep the engines off it);
each rollout node has room for one engine. The job (``rollout.num_actors: auto``, 1 to 2 engines)
starts on node A and always has one more placement asked for. Node B joins after step 2: an engine
starts there, is brought to the learner's weights at the next push and gets work. Node A then goes
away while a call of its engine is in flight (the tests' fault switch holds it there), its raylet
and every process on it stopping as a preempted spot node's would: the call's groups are redone on
B and the run finishes every step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from ray_head import REPO, start_ray_head, start_ray_node

from segr1.runtime.deadlines import HANG_DIR_ENV

pytestmark = pytest.mark.slow

# About 1 s a step on 2 cores. B's engine is started about 3 steps after B joins and loads in about
# 15 more (steps 5 -> 20, node A gone at 25, measured): 80 leaves room for a machine 2x slower
# at loading, without a long tail of single-engine steps after A has gone.
STEPS = 80
TOL = 1e-4  # the learner's and the engines' log-probs of the same tokens (tests/test_run.py's bound)
JOB = ["python", "-m", "segr1.run", "--model.path", "tiny", "--rollout.max_tokens", "48", "--trainer.eval_every", "0",
       "--rollout.num_actors", "auto", "--rollout.min_actors", "1", "--rollout.max_actors", "2",
       "--rollout.num_cpus_per_actor", "1", "--reward.num_cpus_per_actor", "0.5",
       "--learner.num_cpus_per_worker", "0.5", "--trainer.prompts_per_step", "4", "--trainer.steps", str(STEPS)]


def records(run: Path) -> list[dict]:
    """The training steps' records (read while the job writes: a torn last line is left out)."""
    path = run / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return [r for r in out if "reward" in r]


def job_state(head, job_id: str) -> str:
    """``running``, ``succeeded``, ``failed`` or ``stopped``, from ``ray job status``."""
    status = head.job_cli(["status", job_id])
    text = status.stdout + status.stderr  # where the CLI prints it depends on the terminal
    return next((state for state in ("succeeded", "failed", "stopped") if f"Job '{job_id}' {state}" in text), "running")


def wait_for(what: str, ready, head, job_id: str, timeout_s: float = 300) -> None:
    """Until ``ready()``; the job's state is asked every few seconds (the CLI costs a core-second)."""
    deadline = time.monotonic() + timeout_s
    asked = time.monotonic()
    while not ready():
        if time.monotonic() - asked > 5:
            state = job_state(head, job_id)
            assert state == "running", f"the job {state} before {what}:\n" + head.job_cli(["logs", job_id]).stdout[-6000:]
            asked = time.monotonic()
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(0.2)


def test_elastic_engines_join_with_the_learners_weights_and_leave_without_losing_a_group(tmp_path):
    head = start_ray_head(num_cpus=2, resources={"reward_node": 1, "learner_node": 1})
    nodes = [start_ray_node(head, num_cpus=1, resources={"rollout_node": 1})]
    run, hang_dir = tmp_path / "run", tmp_path / "hang"
    hang_dir.mkdir()
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(REPO)
    runtime_env["env_vars"][HANG_DIR_ENV] = str(hang_dir)  # the tests' fault switch, for the driver and its actors
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    job_id = "elastic"
    try:
        submitted = head.job_cli(["submit", "--no-wait", "--submission-id", job_id, "--runtime-env",
                                  str(tmp_path / "runtime_env.yaml"), "--", *JOB, "--trainer.output_dir", str(run)])
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        wait_for("step 2", lambda: len(records(run)) >= 2, head, job_id)
        nodes.append(start_ray_node(head, num_cpus=1, resources={"rollout_node": 1}))  # node B
        wait_for("steps with two engines", lambda: sum(r["rollout_engines"] == 2 for r in records(run)) >= 3,
                 head, job_id)
        switch = hang_dir / "rollout-0.generate"
        switch.touch()  # rollout-0's next call hangs: node A goes with groups in flight
        wait_for("the hung call", lambda: not switch.exists(), head, job_id)
        nodes.pop(0).stop()  # node A, its engine with it
        deadline = time.monotonic() + 300
        while (state := job_state(head, job_id)) == "running":
            assert time.monotonic() < deadline, "the job did not end within 300 s of node A leaving"
            time.sleep(3)
        assert state == "succeeded", head.job_cli(["logs", job_id]).stdout[-6000:]
    finally:
        for node in nodes:
            node.stop()
        head.stop()

    steps = records(run)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # every step, each once
    engines = [r["rollout_engines"] for r in steps]
    assert engines[0] == 1 and engines[-1] == 1 and 2 in engines, engines
    # Sync mode: every group was sampled on the weights the learner held, the new engine's included.
    assert max(r["logprob_gap_max"] for r in steps) < TOL
    assert sum(r["groups_refilled"] for r in steps) == 0  # no group lost (a lost one is refilled)
    assert sum(r["groups_redone"] for r in steps) >= 1  # the hung call's, on rollout-1
    assert all(r["staleness"] == 0 for r in steps)
    driver = (run / "logs" / "driver.log").read_text()
    assert "rollout-1 has loaded" in driver and "rollout: rollout-1 gets work (2 engines)" in driver
    assert "rollout-0 is gone: its calls are redone on the other actors" in driver
    (line,) = [line for line in driver.splitlines() if "rollout engines (groups made):" in line]
    made = dict(part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", "))
    assert set(made) == {"rollout-0 (gone)", "rollout-1"} and int(made["rollout-1"]) > 0, line
    # Each step's 4 groups were scored once: what the engines made is what the steps trained on.
    assert sum(int(n) for n in made.values()) == 4 * STEPS, line
