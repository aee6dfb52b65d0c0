"""Run one Ray worker node on loopback until SIGTERM: ``python tests/ray_node.py GCS_ADDRESS CPUS RESOURCES_JSON TEMP_DIR``.

``ray start`` cannot do this on one machine: with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (which
keeps Ray on 127.0.0.1) it refuses to start a worker node, and with ``=1`` it rewrites 127.0.0.1
to the machine's address and cannot reach a loopback head. Ray's own test clusters
(``ray.cluster_utils.Cluster.add_node``) start worker nodes this way instead: a
``ray._private.node.Node`` built from ``RayParams`` in a process of its own. Started by
``tests/ray_head.py:start_ray_node``, which may put it in a mount namespace of its own.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray reads it

import ray._private.node  # noqa: E402
import ray._private.parameter  # noqa: E402


def main(gcs_address: str, num_cpus: str, resources: str, temp_dir: str) -> None:
    params = ray._private.parameter.RayParams(
        gcs_address=gcs_address, node_ip_address="127.0.0.1", num_cpus=float(num_cpus), num_gpus=0,
        resources=json.loads(resources), object_store_memory=256 << 20, temp_dir=temp_dir,
        min_worker_port=0, max_worker_port=0, node_manager_port=0, include_log_monitor=True,
        dashboard_agent_listen_port=None,
    )
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("Ray runtime started", flush=True)
    stop.wait()
    node.kill_all_processes(check_alive=False, allow_graceful=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
