"""The Ray side of the job: join (or start) the cluster, and give each role its own placement group.

``connect`` decides between the two ways the job runs. Under ``ray job submit`` the job manager sets
``RAY_ADDRESS`` for the driver, so the driver joins that cluster and must not stop it afterwards.
Run alone (``python -m segr1.run``), it starts a private single-node cluster whose services, the
dashboard included, listen on 127.0.0.1 only; Ray 2.60 turns token authentication on for it.
``ClusterInfo.started_locally`` tells the caller whether it owns the cluster.

Placement: rollout (vLLM), reward (SAM2) and learner (DeepSpeed) actors each get one placement group
with one bundle per actor, so one role can never take GPUs another role was promised. The cluster
YAMLs in ``cluster/`` advertise a marker resource per node type (``rollout_node: 1`` ...). When the
running cluster has markers, every bundle of a role asks for a sliver of its marker
(``MARKER_PER_BUNDLE``): that pins the role to its node type without limiting how many actors fit
on one node (that limit is the node's GPUs). Without markers (a laptop, a CPU-only test node) the
bundles ask for CPUs and GPUs only and everything shares whatever nodes exist.

``python -m segr1.runtime.ray_cluster node-resources CONFIG`` prints the marker resources of the machine it
runs on, read from an on-premise cluster YAML (see ``cluster/onprem.yaml``): Ray's ``local``
provider has a single node type, so roles are assigned per machine there.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

ROLES = ("rollout", "reward", "learner")
NODE_MARKERS = {role: f"{role}_node" for role in ROLES}
MARKER_PER_BUNDLE = 0.001  # Ray keeps 4 decimals; a node advertising 1 unit takes 1000 bundles
# Rollout engines and SAM2 replicas are independent: spreading them puts each on its own node (own
# NIC and memory bus for weight sync and images) and survives a node loss better. Learner ranks
# talk to each other every step: packing keeps them on one node's NVLink.
DEFAULT_STRATEGY = {"rollout": "SPREAD", "reward": "SPREAD", "learner": "PACK"}
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class PlacementError(RuntimeError):
    """A role's placement group could not be scheduled in time."""


@dataclass(frozen=True)
class ClusterInfo:
    """What the driver learned on connecting; ``started_locally`` means this process owns the cluster."""

    dashboard_url: str | None
    started_locally: bool
    num_cpus: float
    num_gpus: float
    node_resources: dict[str, dict[str, float]] = field(default_factory=dict)  # node id -> resources


def node_ip() -> str:
    """This node's address as other Ray nodes reach it; loopback outside Ray (tests, benchmarks)."""
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def connect(
    address: str | None = None,
    num_cpus: float | None = None,
    dashboard_host: str = "127.0.0.1",
    dashboard_port: int = 8265,
    runtime_env: dict[str, Any] | None = None,
) -> ClusterInfo:
    """Join the cluster named by ``address`` / ``RAY_ADDRESS`` ("auto" finds a local one), else start one.

    ``num_cpus`` and the dashboard settings only apply to a cluster started here. If Ray is already
    initialised in this process (a test fixture, a notebook), that connection is described and
    ``started_locally`` is False: whoever called ``ray.init`` shuts it down.
    """
    if ray.is_initialized():
        return describe_cluster(started_locally=False)
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or "local"
    if address != "local":
        ray.init(address=address, runtime_env=runtime_env)
        return describe_cluster(started_locally=False)
    # address="local" forces a new cluster: plain ray.init() would join any cluster that a
    # `ray start` on this machine recorded in /tmp/ray, which may be someone else's.
    with _single_machine_mode():
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host=dashboard_host,
            dashboard_port=dashboard_port,
            _node_ip_address="127.0.0.1",
            runtime_env=runtime_env,
        )
    info = describe_cluster(started_locally=True)
    print(
        f"Ray dashboard: {info.dashboard_url} (token authentication is on; `ray get-auth-token` "
        "prints the token the login page asks for)",
        flush=True,
    )
    return info


@contextmanager
def _single_machine_mode() -> Iterator[None]:
    """Make a cluster started inside this block bind its services to 127.0.0.1 only.

    Ray 2.60 ignores ``_node_ip_address="127.0.0.1"`` unless its single-machine switch,
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, is on: otherwise it resolves "127.0.0.1" to the
    machine's network address and the GCS, raylet and agents listen on every interface. Ray reads
    the variable once, when it is imported, so this sets both the variable (inherited by the
    processes ``ray.init`` starts) and the constant Ray already read from it. Both are restored
    afterwards: the started node keeps its loopback address, and a later ``ray.init`` in this
    process that joins a real cluster is not affected.
    """
    from ray._private import ray_constants

    saved_env = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = saved_env


def describe_cluster(started_locally: bool) -> ClusterInfo:
    """Totals and per-node resources of the connected cluster (alive nodes only)."""
    from ray._private.worker import get_dashboard_url  # what ray.init's RayContext.dashboard_url calls

    dashboard_url = get_dashboard_url()
    if dashboard_url and "://" not in dashboard_url:
        dashboard_url = f"http://{dashboard_url}"
    totals = ray.cluster_resources()
    nodes = {n["NodeID"]: dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")}
    return ClusterInfo(
        dashboard_url=dashboard_url or None,
        started_locally=started_locally,
        num_cpus=float(totals.get("CPU", 0.0)),
        num_gpus=float(totals.get("GPU", 0.0)),
        node_resources=nodes,
    )


@dataclass(frozen=True)
class RoleRequest:
    """``count`` actors of one role, each needing ``num_cpus`` CPUs and ``num_gpus`` GPUs."""

    role: str
    count: int
    num_cpus: float
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r}: must be one of {list(ROLES)}")
        if self.count < 1:
            raise ValueError(f"{self.role}: count must be >= 1, got {self.count}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"{self.role}: num_cpus and num_gpus must be >= 0")
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise ValueError(f"{self.role}: each actor needs some CPU or GPU (Ray rejects empty bundles)")


def bundle_for(request: RoleRequest, cluster_resources: dict[str, float]) -> dict[str, float]:
    """One actor's bundle; carries the role's marker when the cluster uses markers at all.

    Any marker counts, not only this role's: on a marked cluster whose rollout nodes are all
    scaled down, the rollout bundles must still ask for ``rollout_node``, so that the autoscaler
    boots a rollout node instead of the engines taking the learner's or reward's GPUs.
    """
    bundle: dict[str, float] = {}
    if request.num_cpus > 0:
        bundle["CPU"] = float(request.num_cpus)
    if request.num_gpus > 0:
        bundle["GPU"] = float(request.num_gpus)
    if any(cluster_resources.get(marker, 0) > 0 for marker in NODE_MARKERS.values()):
        bundle[NODE_MARKERS[request.role]] = MARKER_PER_BUNDLE
    return bundle


@dataclass
class RolePlacement:
    """A ready placement group for one role: actor ``i`` goes to bundle ``i``."""

    request: RoleRequest
    placement_group: PlacementGroup
    bundles: list[dict[str, float]]
    strategy: str
    ready_ref: Any  # the group's ready() object: one per group, however often is_ready asks

    def is_ready(self) -> bool:
        """Whether Ray has reserved every bundle (a pending group is what the autoscaler scales for)."""
        ready, _ = ray.wait([self.ready_ref], timeout=0)
        return bool(ready)

    def bundle_index(self, actor_index: int) -> int:
        if not 0 <= actor_index < len(self.bundles):
            raise IndexError(f"{self.request.role}: actor {actor_index} but only {len(self.bundles)} bundles")
        return actor_index

    def scheduling_strategy(self, actor_index: int, capture_child_tasks: bool = False) -> PlacementGroupSchedulingStrategy:
        """Pass as ``.options(scheduling_strategy=...)``; the actor's own asks must fit its bundle.

        ``capture_child_tasks`` puts what the actor itself launches into the same group; a vLLM
        engine with tensor parallelism > 1 finds its group that way (``get_current_placement_group``).
        """
        return PlacementGroupSchedulingStrategy(
            placement_group=self.placement_group,
            placement_group_bundle_index=self.bundle_index(actor_index),
            placement_group_capture_child_tasks=capture_child_tasks,
        )

    def remove(self) -> None:
        remove_placement_group(self.placement_group)


def role_placement(
    request: RoleRequest, timeout_s: float = 300.0, strategy: str | None = None, name: str | None = None
) -> RolePlacement:
    """Create the role's placement group and wait until Ray has reserved every bundle.

    The default timeout leaves the autoscaler time to boot GPU nodes. On timeout the pending group
    is removed (it would otherwise grab resources later) and ``PlacementError`` says what was asked
    for and what the cluster has.
    """
    placement = pending_placement(request, strategy, name)
    ready, _ = ray.wait([placement.ready_ref], timeout=timeout_s)
    if not ready:
        placement.remove()
        raise PlacementError(_placement_failure(request, placement.bundles[0], placement.strategy, timeout_s))
    return placement


def pending_placement(request: RoleRequest, strategy: str | None = None, name: str | None = None) -> RolePlacement:
    """The role's placement group as asked for, not waited on (``is_ready`` tells); ``name``: the
    group's, ``segr1-<role>`` by default (Ray wants names unique while their groups live)."""
    strategy = strategy or DEFAULT_STRATEGY[request.role]
    if strategy not in STRATEGIES:
        raise ValueError(f"{request.role}: strategy {strategy!r} is not one of {list(STRATEGIES)}")
    bundle = bundle_for(request, ray.cluster_resources())
    bundles = [dict(bundle) for _ in range(request.count)]
    group = placement_group(bundles, strategy=strategy, name=name or f"segr1-{request.role}")
    return RolePlacement(request, group, bundles, strategy, group.ready())


def place_roles(requests: list[RoleRequest], timeout_s: float = 300.0) -> dict[str, RolePlacement]:
    """One placement group per role, in order; if one fails, the ones already made are removed."""
    placed: dict[str, RolePlacement] = {}
    try:
        for request in requests:
            if request.role in placed:
                raise ValueError(f"role {request.role!r} requested twice")
            placed[request.role] = role_placement(request, timeout_s)
    except BaseException:
        for placement in placed.values():
            placement.remove()
        raise
    return placed


def _placement_failure(request: RoleRequest, bundle: dict[str, float], strategy: str, timeout_s: float) -> str:
    wanted = {key: round(value * request.count, 4) for key, value in bundle.items()}
    available = {k: round(v, 4) for k, v in sorted(ray.available_resources().items()) if _is_schedulable(k)}
    total = {k: round(v, 4) for k, v in sorted(ray.cluster_resources().items()) if _is_schedulable(k)}
    marker = NODE_MARKERS[request.role]
    marked = sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get(marker, 0) > 0)
    return (
        f"could not place role {request.role!r} within {timeout_s:g} s: requested {request.count} "
        f"bundle(s) of {bundle} (total {wanted}, strategy {strategy}); the cluster has available "
        f"{available} of total {total}, and {marked} node(s) carry {marker!r}. Lower the role's "
        f"count or per-actor CPUs/GPUs in the job config, or add nodes of the {request.role} type "
        "(min_workers in cluster/*.yaml)."
    )


_PG_RESOURCE = re.compile(r"_group_(\d+_)?[0-9a-f]{20,}$")  # "CPU_group_0_<pg id>": held by placement groups


def _is_schedulable(resource: str) -> bool:
    # Per-node ids ("node:10.0.0.5"), byte counts and placement groups' own resources only clutter.
    if resource.startswith("node:") or resource in ("memory", "object_store_memory"):
        return False
    return _PG_RESOURCE.search(resource) is None


# ---------------------------------------------------------------- on-premise node roles


def node_roles(config: dict[str, Any], config_name: str = "cluster config") -> dict[str, list[str]]:
    """``metadata.segr1_node_roles`` of an on-premise YAML: host -> roles, each a known role."""
    roles = (config.get("metadata") or {}).get("segr1_node_roles")
    if not isinstance(roles, dict) or not roles:
        raise ValueError(f"{config_name}: metadata.segr1_node_roles must map each host to its roles")
    result: dict[str, list[str]] = {}
    for host, value in roles.items():
        listed = [value] if isinstance(value, str) else list(value or [])
        unknown = [role for role in listed if role not in ROLES]
        if unknown:
            raise ValueError(f"{config_name}: host {host!r} has unknown role(s) {unknown}; known: {list(ROLES)}")
        result[str(host)] = listed
    return result


def node_resources_for(roles: dict[str, list[str]], addresses: set[str]) -> dict[str, int] | None:
    """Marker resources of the host known by any of ``addresses``; None if no entry matches."""
    for host, listed in roles.items():
        if host in addresses or _resolve(host) in addresses:
            return {NODE_MARKERS[role]: 1 for role in listed}
    return None


def host_addresses() -> set[str]:
    """Every name and IPv4 address this machine answers to."""
    import psutil  # installed with ray[default]; only this on-prem helper needs it

    names = {socket.gethostname(), socket.getfqdn()}
    ips = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}
    return names | ips


def _resolve(host: str) -> str | None:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    """``node-resources CONFIG``: print this machine's marker resources as JSON for ``ray start``."""
    import yaml

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "node-resources":
        print("usage: python -m segr1.runtime.ray_cluster node-resources CLUSTER_YAML", file=sys.stderr)
        return 2
    path = Path(args[1]).expanduser()
    config = yaml.safe_load(path.read_text())
    addresses = host_addresses()
    resources = node_resources_for(node_roles(config, str(path)), addresses)
    if resources is None:
        print(f"{path}: this machine ({sorted(addresses)}) is not listed in metadata.segr1_node_roles",
              file=sys.stderr)
        return 1
    print(json.dumps(resources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
