"""The files in cluster/ against Ray's own autoscaler schema and against the job they must carry,
plus segr1.runtime.ray_cluster's placement helpers (pure parts fast, on a real local Ray marked slow)."""

from __future__ import annotations

import json
import re
import shlex
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import jsonschema
import psutil
import pytest
import ray
import yaml
from ray._raylet import AuthenticationTokenLoader
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from segr1.config import load_config
from segr1.runtime.ray_cluster import (
    MARKER_PER_BUNDLE,
    NODE_MARKERS,
    ROLES,
    PlacementError,
    RoleRequest,
    bundle_for,
    connect,
    main,
    node_resources_for,
    node_roles,
    place_roles,
    role_placement,
)
from segr1.train.job import role_requests

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CLUSTER_YAMLS = ["aws", "gcp", "onprem"]
CLOUD_YAMLS = ["aws", "gcp"]
SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|API_?KEY|ACCESS_KEY)(_|$)", re.I)
SECRET_VALUE = re.compile(r"\b[0-9a-f]{64}\b|\bhf_[A-Za-z0-9]{20,}|\bAKIA[0-9A-Z]{16}\b")


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def segr1_args(command: str) -> list[str]:
    """The arguments after ``python -m segr1.run`` in a shell command line."""
    words = shlex.split(command)
    start = next(i for i in range(len(words) - 2) if words[i:i + 3] == ["python", "-m", "segr1.run"])
    return words[start + 3:]


def job_config(args: list[str]):
    """``--config NAME`` plus dotted overrides, loaded and validated by segr1.config."""
    i = args.index("--config")
    return load_config(args[i + 1], args[:i] + args[i + 2:])


def gpus_needed(config) -> dict[str, float]:
    return {request.role: request.count * request.num_gpus for request in role_requests(config, use_gpus=True)}


def secret_looking(data, path: str = "") -> list[str]:
    """Paths of keys named like a secret or values shaped like one, anywhere in a parsed file."""
    found = []
    if isinstance(data, dict):
        for key, value in data.items():
            if SECRET_NAME.search(str(key)):
                found.append(f"{path}/{key}")
            found += secret_looking(value, f"{path}/{key}")
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found += secret_looking(value, f"{path}[{i}]")
    elif isinstance(data, str) and SECRET_VALUE.search(data):
        found.append(path)
    return found


# ------------------------------------------------------------------ cluster launcher YAMLs


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_cluster_yaml_passes_rays_own_validation(name):
    prepared = prepare_config(load(f"{name}.yaml"))  # what `ray up` does before validating
    validate_config(prepared)
    assert prepared["provider"]["type"] == {"aws": "aws", "gcp": "gcp", "onprem": "local"}[name]


def test_rays_validator_rejects_a_broken_node_type():
    broken = load("aws.yaml")
    broken["available_node_types"]["rollout"]["resources"]["rollout_node"] = 0.5  # schema: integers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    typo = load("aws.yaml")
    typo["available_node_types"]["rollout"]["min_wokers"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(typo))


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_cloud_yaml_has_a_gpu_node_type_per_role_carrying_its_marker(name):
    config = load(f"{name}.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not set(head["resources"]) & set(NODE_MARKERS.values())
    for role in ROLES:
        node_type = types[role]
        assert node_type["resources"][NODE_MARKERS[role]] == 1
        assert node_type["resources"]["GPU"] >= 1
        assert not set(node_type["resources"]) & (set(NODE_MARKERS.values()) - {NODE_MARKERS[role]})
    assert types["rollout"]["min_workers"] < types["rollout"]["max_workers"]
    assert types["learner"]["min_workers"] == types["learner"]["max_workers"] == 1
    assert config["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values())


@pytest.mark.parametrize("name", CLOUD_YAMLS)
def test_cloud_yaml_fits_every_documented_submission(name):
    """Each `ray job submit` in docs/cluster.md asks for no more GPUs than the node types can offer."""
    types = load(f"{name}.yaml")["available_node_types"]
    capacity = {role: types[role]["max_workers"] * types[role]["resources"]["GPU"] for role in ROLES}
    submissions = [c for c in documented_commands() if c.lstrip().startswith("ray job submit")]
    assert len(submissions) >= 3
    for command in submissions:
        needed = gpus_needed(job_config(segr1_args(command)))
        assert all(needed[role] <= capacity[role] for role in ROLES), (command, needed, capacity)
        assert needed["rollout"] > types["rollout"]["min_workers"]  # the autoscaler adds rollout nodes


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_cluster_yaml_keeps_the_dashboard_private_and_token_auth_on(name):
    config = load(f"{name}.yaml")
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "export RAY_AUTH_MODE=token" in command
    assert "RAY_AUTH_MODE=disabled" not in json.dumps(config)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("uv sync --locked --extra cuda" in c for c in config["setup_commands"])
    # The token travels as a file mounted from the user's machine, never as text in the YAML.
    assert SECRET_VALUE.search((CLUSTER / f"{name}.yaml").read_text()) is None


def test_onprem_role_map_covers_every_machine_and_role():
    config = load("onprem.yaml")
    roles = node_roles(config, "onprem.yaml")
    machines = [config["provider"]["head_ip"], *config["provider"]["worker_ips"]]
    assert sorted(roles) == sorted(machines)
    assert {role for listed in roles.values() for role in listed} == set(ROLES)
    learner_host = next(host for host, listed in roles.items() if listed == ["learner"])
    assert node_resources_for(roles, {learner_host}) == {"learner_node": 1}
    assert node_resources_for(roles, {config["provider"]["head_ip"]}) == {}
    assert node_resources_for(roles, {"203.0.113.9"}) is None


def test_node_roles_rejects_unknown_roles():
    with pytest.raises(ValueError, match="unknown role.*'trainer'"):
        node_roles({"metadata": {"segr1_node_roles": {"10.0.0.1": ["trainer"]}}}, "x.yaml")
    with pytest.raises(ValueError, match="segr1_node_roles"):
        node_roles({"metadata": {}}, "x.yaml")


def test_node_resources_cli_prints_this_machines_markers(tmp_path, capsys):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"metadata": {"segr1_node_roles": {"127.0.0.1": ["rollout", "reward"]}}}))
    assert main(["node-resources", str(path)]) == 0
    assert json.loads(capsys.readouterr().out) == {"rollout_node": 1, "reward_node": 1}
    path.write_text(yaml.safe_dump({"metadata": {"segr1_node_roles": {"10.255.255.254": ["rollout"]}}}))
    assert main(["node-resources", str(path)]) == 1
    assert "is not listed in metadata.segr1_node_roles" in capsys.readouterr().err


# ------------------------------------------------------------------ KubeRay and runtime env


def test_kuberay_rayjob_has_three_role_groups_with_markers_and_token_auth():
    job = load("kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"] == ray.__version__
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == set(ROLES)
    for role, group in groups.items():
        # KubeRay's format: a JSON object wrapped in one more pair of quotes.
        resources = json.loads(group["rayStartParams"]["resources"].strip('"').replace('\\"', '"'))
        assert resources == {NODE_MARKERS[role]: 1}
    assert groups["rollout"]["minReplicas"] < groups["rollout"]["maxReplicas"]
    assert groups["learner"]["minReplicas"] == groups["learner"]["maxReplicas"] == 1


def test_kuberay_entrypoint_is_a_valid_segr1_job_that_fits_its_groups():
    job = load("kuberay-rayjob.yaml")
    assert job["spec"]["entrypoint"].startswith("python -m segr1.run ")
    config = job_config(segr1_args(job["spec"]["entrypoint"]))
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    for role, needed in gpus_needed(config).items():
        limits = groups[role]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert needed <= groups[role]["maxReplicas"] * int(limits["nvidia.com/gpu"]), role
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"] == load("runtime_env.yaml")["env_vars"]
    assert secret_looking(job) == []


def test_runtime_env_is_accepted_by_ray_and_ships_no_secrets():
    data = load("runtime_env.yaml")
    RuntimeEnv(**data)  # Ray's own validation of field names and types
    assert data["working_dir"] == "."
    assert {".git", ".venv", "data", "checkpoints", "runs"} <= set(data["excludes"])
    assert all(isinstance(v, str) for v in data["env_vars"].values())
    assert secret_looking(data) == []


def test_secret_detector_catches_planted_secrets():
    planted = {"env_vars": {"HF_TOKEN": "x", "AWS_SECRET_ACCESS_KEY": "y", "OK": "a" * 64}}
    assert secret_looking(planted) == ["/env_vars/HF_TOKEN", "/env_vars/AWS_SECRET_ACCESS_KEY", "/env_vars/OK"]
    assert secret_looking({"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}) == []


def documented_commands() -> list[str]:
    """Every `python -m segr1.run` command in docs/cluster.md's code blocks (continuations joined)."""
    blocks = (REPO / "docs" / "cluster.md").read_text().split("```")[1::2]
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if "python -m segr1.run" in line]


def test_documented_commands_are_valid_jobs():
    commands = documented_commands()
    assert len(commands) >= 3
    for command in commands:
        job_config(segr1_args(command))  # raises ConfigError naming the bad key


# ------------------------------------------------------------------ placement helpers (pure)


def test_bundle_carries_the_role_marker_only_on_a_marked_cluster():
    request = RoleRequest("rollout", 2, num_cpus=1, num_gpus=1)
    assert bundle_for(request, {"CPU": 8, "GPU": 2}) == {"CPU": 1.0, "GPU": 1.0}
    assert bundle_for(request, {"CPU": 8, "GPU": 2, "rollout_node": 2, "reward_node": 1}) == {
        "CPU": 1.0, "GPU": 1.0, "rollout_node": MARKER_PER_BUNDLE}
    # Rollout nodes all scaled down: the bundle still asks for one, so the autoscaler boots it.
    assert bundle_for(request, {"CPU": 104, "GPU": 9, "learner_node": 1, "reward_node": 1}) == {
        "CPU": 1.0, "GPU": 1.0, "rollout_node": MARKER_PER_BUNDLE}
    assert bundle_for(RoleRequest("learner", 1, 0.5), {"CPU": 2, "learner_node": 1}) == {
        "CPU": 0.5, "learner_node": MARKER_PER_BUNDLE}


@pytest.mark.parametrize(("args", "message"), [
    (("trainer", 1, 1.0), "role 'trainer'"),
    (("rollout", 0, 1.0), "count must be >= 1"),
    (("reward", 1, -1.0), "must be >= 0"),
    (("learner", 1, 0.0, 0.0), "needs some CPU or GPU"),
])
def test_role_request_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        RoleRequest(*args)


def test_role_requests_follow_the_config_and_drop_gpus_only_when_told():
    config = load_config("tiny", [
        "--rollout.num_actors", "3", "--rollout.num_cpus_per_actor", "0.25", "--rollout.num_gpus_per_actor", "2",
        "--reward.num_actors", "2", "--reward.num_cpus_per_actor", "0.5", "--reward.num_gpus_per_actor", "0.5",
        "--learner.num_workers", "4", "--learner.num_cpus_per_worker", "0.75", "--learner.num_gpus_per_worker", "1",
    ])
    on_gpus = {r.role: (r.count, r.num_cpus, r.num_gpus) for r in role_requests(config, use_gpus=True)}
    assert on_gpus == {"rollout": (3, 0.25, 2.0), "reward": (2, 0.5, 0.5), "learner": (4, 0.75, 1.0)}
    on_cpu = {r.role: (r.count, r.num_cpus, r.num_gpus) for r in role_requests(config, use_gpus=False)}
    assert on_cpu == {"rollout": (3, 0.25, 0.0), "reward": (2, 0.5, 0.0), "learner": (4, 0.75, 0.0)}
    elastic = load_config("tiny", ["--rollout.num_actors", "auto", "--rollout.min_actors", "2"]).rollout
    assert (elastic.elastic, elastic.first_actors, elastic.most_actors) == (True, 2, 8)
    # An elastic pool places each engine itself, one placement group per engine.
    assert [r.role for r in role_requests(replace(config, rollout=elastic), use_gpus=True)] == ["reward", "learner"]


# ------------------------------------------------------------------ placement on a real local Ray


@pytest.fixture(scope="module")
def local_ray():
    """This module's own local cluster, unless another fixture already initialised Ray here."""
    from ray_head import free_port

    info = connect(None, num_cpus=2, dashboard_port=free_port())
    yield info
    if info.started_locally:
        ray.shutdown()


def http_status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _listening(proc: psutil.Process) -> list:
    try:
        return [conn for conn in proc.net_connections(kind="inet") if conn.status == "LISTEN"]
    except psutil.Error:  # a worker that exited meanwhile
        return []


@pytest.mark.slow
def test_connect_starts_a_private_local_cluster(local_ray):
    if not local_ray.started_locally:
        pytest.skip("Ray was already initialised in this process, so connect() did not start it")
    assert local_ray.dashboard_url.startswith("http://127.0.0.1:")
    assert local_ray.num_cpus == 2.0 and local_ray.num_gpus == 0.0
    assert len(local_ray.node_resources) == 1
    # Token authentication is on: the dashboard refuses a request without the token.
    token = AuthenticationTokenLoader.instance().get_raw_token(ignore_auth_mode=True)
    assert http_status(local_ray.dashboard_url + "/api/version") == 401
    assert http_status(local_ray.dashboard_url + "/api/version", token) == 200
    # Every service of the started cluster (this process's children) listens on loopback only.
    listening = {conn.laddr.ip for proc in psutil.Process().children(recursive=True)
                 for conn in _listening(proc)}
    assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening
    again = connect(None, num_cpus=8)  # already connected: described, not restarted
    assert again.started_locally is False and again.num_cpus == 2.0


@pytest.mark.slow
def test_roles_get_one_ready_placement_group_each(local_ray):
    requests = role_requests(load_config("tiny"), use_gpus=False)  # the default job, CPU only
    assert sum(r.count * r.num_cpus for r in requests) <= 2  # fractional CPUs: all fit on 2 cores
    placements = place_roles(requests, timeout_s=60)
    try:
        assert set(placements) == set(ROLES)
        for request in requests:
            placement = placements[request.role]
            assert ray.util.placement_group_table(placement.placement_group)["state"] == "CREATED"
            assert placement.bundles == [{"CPU": request.num_cpus}] * request.count
        assert placements["learner"].strategy == "PACK" and placements["rollout"].strategy == "SPREAD"

        @ray.remote(num_cpus=placements["reward"].request.num_cpus)
        def group_of_this_task() -> str:
            return ray.get_runtime_context().get_placement_group_id()

        reward = placements["reward"]
        seen = ray.get(group_of_this_task.options(scheduling_strategy=reward.scheduling_strategy(0)).remote())
        assert seen == reward.placement_group.id.hex()
        with pytest.raises(IndexError, match="bundles"):
            reward.bundle_index(reward.request.count)
    finally:
        for placement in placements.values():
            placement.remove()


@pytest.mark.slow
def test_impossible_placement_fails_fast_naming_role_request_and_cluster(local_ray):
    with pytest.raises(PlacementError) as caught:
        role_placement(RoleRequest("learner", 2, num_cpus=1, num_gpus=4), timeout_s=3)
    message = str(caught.value)
    assert "role 'learner'" in message
    assert "'GPU': 8.0" in message  # the total asked for
    assert "0 node(s) carry 'learner_node'" in message
    assert f"'CPU': {ray.cluster_resources()['CPU']}" in message  # what the cluster has
    # The failed group was removed, so it holds nothing and a feasible request still fits.
    fits = role_placement(RoleRequest("learner", 1, num_cpus=0.5), timeout_s=60)
    fits.remove()
