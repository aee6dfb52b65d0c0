"""`ray job submit` against a real head node on loopback with token authentication on.

One head for the module (``tests/ray_head.py`` starts it and stops it by process id); each test
submits through the real ``ray job`` CLI the way docs/cluster.md tells users to.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator

import psutil
import pytest
import ray
from ray_head import REPO, RayHead, start_ray_head

pytestmark = pytest.mark.slow

MARKERS = {"rollout_node": 1, "reward_node": 1, "learner_node": 1}
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}

# What the training job does first: import the packages, join the cluster it was submitted to, and
# place the three roles. It prints one JSON line for the test to read.
JOB_CODE = """
import json, ray, segr1, actors, learner
from segr1.runtime.ray_cluster import RoleRequest, connect, place_roles

info = connect(None, None)
placements = place_roles(
    [RoleRequest("rollout", 2, 0.25), RoleRequest("reward", 1, 0.25), RoleRequest("learner", 1, 0.25)],
    timeout_s=120,
)

@ray.remote(num_cpus=0.25)
def placement_group_of_this_task():
    return ray.get_runtime_context().get_placement_group_id()

seen = ray.get(placement_group_of_this_task.options(
    scheduling_strategy=placements["rollout"].scheduling_strategy(1)).remote())
print("SEGR1_RESULT " + json.dumps({
    "started_locally": info.started_locally,
    "num_cpus": info.num_cpus,
    "dashboard_url": info.dashboard_url,
    "bundles": {role: p.bundles for role, p in placements.items()},
    "strategies": {role: p.strategy for role, p in placements.items()},
    "rollout_group": placements["rollout"].placement_group.id.hex(),
    "task_group": seen,
    "segr1_file": segr1.__file__,
}))
"""


@pytest.fixture(scope="module")
def head() -> Iterator[RayHead]:
    started = start_ray_head(num_cpus=2, resources=MARKERS)
    yield started
    started.stop()
    assert not started.processes(), "processes of the test's Ray head outlived stop()"


def job_output(result) -> str:
    return result.stdout + result.stderr


def test_dashboard_answers_only_with_the_token(head):
    assert head.http_get("/api/version", token=None)[0] == 401
    assert head.http_get("/api/version", token="0" * 64)[0] == 403
    status, body = head.http_get("/api/version")
    assert status == 200
    assert json.loads(body)["ray_version"] == ray.__version__


def test_every_service_listens_on_loopback_only(head):
    listening = set()
    for proc in head.processes():
        try:
            listening |= {(proc.name(), c.laddr.ip, c.laddr.port)
                          for c in proc.net_connections(kind="inet") if c.status == "LISTEN"}
        except psutil.NoSuchProcess:  # an idle worker that exited meanwhile
            continue
    assert len(listening) >= 5, listening  # GCS, raylet, dashboard, agents at least
    assert {ip for _, ip, _ in listening} <= LOOPBACK, listening


def test_submit_with_token_runs_the_job(head):
    result = head.submit(["python", "-c", "print('sum', sum(range(1000)))"])
    assert result.returncode == 0, job_output(result)
    assert "sum 499500" in result.stdout
    assert "succeeded" in job_output(result)


def test_submit_without_token_is_refused(head):
    result = head.submit(["python", "-c", "print('should not run')"], token=None)
    assert result.returncode != 0
    assert "Missing authentication token" in job_output(result)
    assert "should not run" not in result.stdout


def test_submit_with_wrong_token_is_refused(head):
    result = head.submit(["python", "-c", "print('should not run')"], token="f" * 64)
    assert result.returncode != 0
    assert "Invalid authentication token" in job_output(result)


def test_job_joins_the_cluster_and_places_roles_on_marked_nodes(head):
    result = head.submit(["python", "-c", JOB_CODE], runtime_env=REPO / "cluster" / "runtime_env.yaml")
    assert result.returncode == 0, job_output(result)[-4000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("SEGR1_RESULT "))
    seen = json.loads(line.removeprefix("SEGR1_RESULT "))
    assert seen["started_locally"] is False
    assert seen["num_cpus"] == 2.0
    assert seen["dashboard_url"] == head.dashboard_url
    assert seen["bundles"] == {
        "rollout": [{"CPU": 0.25, "rollout_node": 0.001}] * 2,
        "reward": [{"CPU": 0.25, "reward_node": 0.001}],
        "learner": [{"CPU": 0.25, "learner_node": 0.001}],
    }
    assert seen["strategies"] == {"rollout": "SPREAD", "reward": "SPREAD", "learner": "PACK"}
    assert seen["task_group"] == seen["rollout_group"]
    # The code ran from the working_dir that cluster/runtime_env.yaml uploaded, not from the checkout.
    assert seen["segr1_file"].startswith(str(head.temp_dir)), seen["segr1_file"]


# A stand-in for the trainer's SIGTERM handler: it needs longer than Ray's default 3 s grace period.
# The markers it prints are computed, because the job log starts with the entrypoint's own text.
SLOW_STOP_CODE = """
import signal, sys, time
def finish(signum, frame):
    time.sleep(6)
    print("saved-" + str(6 * 7), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, finish)
print("training-" + str(6 * 7), flush=True)
time.sleep(600)
"""


def test_job_stop_leaves_the_driver_time_to_checkpoint(head):
    job_id = f"segr1-stop-{secrets.token_hex(4)}"
    runtime_env = str(REPO / "cluster" / "runtime_env.yaml")
    submitted = head.job_cli(["submit", "--no-wait", "--submission-id", job_id, "--runtime-env", runtime_env,
                              "--", "python", "-c", SLOW_STOP_CODE])
    assert submitted.returncode == 0, job_output(submitted)
    deadline = time.monotonic() + 180
    while "training-42" not in head.job_cli(["logs", job_id]).stdout:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(2)
    stopped = head.job_cli(["stop", job_id])
    assert stopped.returncode == 0, job_output(stopped)
    assert "saved-42" in head.job_cli(["logs", job_id]).stdout
