"""A private Ray head node for tests: loopback only, token authentication on, stopped by process id.

``start_ray_head()`` runs ``ray start --head --block`` in its own session with every port chosen
free and every service bound to 127.0.0.1, a fresh temp dir, and a token of its own (a file passed
as ``RAY_AUTH_TOKEN_PATH``), so it neither reads nor disturbs ``~/.ray/auth_token`` or anyone
else's cluster on the machine. ``RayHead.stop()`` ends only what this head started: the
``ray start`` process (whose SIGTERM handler drains and stops its services), then any of its
descendants or processes naming its temp dir that are still alive. It never runs ``ray stop``.

How a client sends the token (Ray 2.60, read from ``ray/_private/authentication``): the job CLI and
SDK add ``Authorization: Bearer <token>`` only when ``RAY_AUTH_MODE=token`` is set in the client's
environment; the token comes from ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``. ``client_env()`` builds those variables.

Reuse: ``head.submit(["python", "-m", "segr1.run", "--config", "tiny"], runtime_env=...)``.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _base_env() -> dict[str, str]:
    """The caller's environment without anything that would point Ray elsewhere."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS and k != "RAY_ADDRESS"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # job entrypoints find the venv's python
    return env


@dataclass
class RayHead:
    process: subprocess.Popen
    temp_dir: Path
    gcs_address: str
    dashboard_url: str
    token_path: Path
    log_path: Path

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    def client_env(self, token: str | None = "cluster") -> dict[str, str]:
        """Environment for a CLI client: ``"cluster"`` sends this head's token, None sends none,
        any other string is sent as the token instead (to test a wrong one)."""
        env = _base_env()
        if token == "cluster":
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        elif token is not None:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        return env

    def http_get(self, path: str, token: str | None = "cluster") -> tuple[int, str]:
        """GET on the dashboard with the token in the header (or none, or a given one)."""
        request = urllib.request.Request(self.dashboard_url + path)
        if token is not None:
            request.add_header("Authorization", f"Bearer {self.token if token == 'cluster' else token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def job_cli(self, args: list[str], token: str | None = "cluster", timeout_s: float = 300) -> subprocess.CompletedProcess:
        """``ray job <args> --address <dashboard>`` as a user would type it."""
        command = [str(VENV_BIN / "ray"), "job", args[0], "--address", self.dashboard_url, *args[1:]]
        return subprocess.run(command, env=self.client_env(token), cwd=REPO, capture_output=True,
                              text=True, timeout=timeout_s)

    def submit(
        self,
        entrypoint: list[str],
        runtime_env: Path | None = None,
        working_dir: Path | None = None,
        token: str | None = "cluster",
        timeout_s: float = 300,
    ) -> subprocess.CompletedProcess:
        """Submit, wait for the job to end and return the CLI's result (its output has the job's logs)."""
        args = ["submit"]
        if runtime_env is not None:
            args += ["--runtime-env", str(runtime_env)]
        if working_dir is not None:
            args += ["--working-dir", str(working_dir)]
        return self.job_cli([*args, "--", *entrypoint], token=token, timeout_s=timeout_s)

    def processes(self) -> list[psutil.Process]:
        """Every live process this head started: the ``ray start`` tree and anything naming its temp dir."""
        found: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(self.process.pid)
            found[root.pid] = root
            found.update({p.pid: p for p in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
        marker = str(self.temp_dir)
        for proc in psutil.process_iter(["cmdline"]):
            if any(marker in part for part in proc.info["cmdline"] or []):
                found.setdefault(proc.pid, proc)
        return list(found.values())

    def stop(self, timeout_s: float = 40) -> None:
        # ray start --block drains on SIGTERM, then stops its services
        _terminate(self.process, self.processes(), timeout_s)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _terminate(process: subprocess.Popen, leftovers: list[psutil.Process], timeout_s: float) -> None:
    """SIGTERM ``process`` (SIGKILL after ``timeout_s``), then kill whatever of ``leftovers`` outlived it."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    _, alive = psutil.wait_procs(leftovers, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def start_ray_head(
    num_cpus: float = 2,
    resources: dict[str, float] | None = None,
    object_store_bytes: int = 512 << 20,
    timeout_s: float = 240,
) -> RayHead:
    """Start the head and wait until the dashboard accepts authenticated job requests."""
    # Short path: Ray's unix sockets live under it and must stay under 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="segr1-ray-", dir="/tmp"))
    token_path = temp_dir / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    gcs_port, dashboard_port = free_port(), free_port()
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        # These default to fixed ports (52365, 10001) that a second cluster on the machine would fight over.
        "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
        "--num-cpus", str(num_cpus), "--object-store-memory", str(object_store_bytes),
        "--temp-dir", str(temp_dir), "--disable-usage-stats",
    ]
    if resources:
        command += ["--resources", json.dumps(resources)]
    env = _base_env()
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    # Two more fixed defaults (44227, 44217): the dashboard's and the autoscaler's metrics servers.
    env.update(DASHBOARD_METRIC_PORT=str(free_port()), AUTOSCALER_METRIC_PORT=str(free_port()))
    log_path = temp_dir / "ray-start.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    head = RayHead(process, temp_dir, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}",
                   token_path, log_path)
    try:
        _wait_ready(head, timeout_s)
    except BaseException:
        head.stop()
        raise
    return head


@dataclass
class RayNode:
    """A worker node joined to a ``RayHead``; ``stop()`` ends its process tree."""

    process: subprocess.Popen
    temp_dir: Path
    log_path: Path

    def stop(self, timeout_s: float = 30) -> None:
        try:
            root = psutil.Process(self.process.pid)
            leftovers = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            leftovers = []
        _terminate(self.process, leftovers, timeout_s)  # the launcher stops its raylet and workers
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray_node(
    head: RayHead,
    num_cpus: float,
    resources: dict[str, float],
    hide: Path | None = None,
    timeout_s: float = 120,
) -> RayNode:
    """Join a worker node (a raylet of its own on this machine, ``tests/ray_node.py``) to ``head``.

    ``hide``: the node runs in a mount namespace of its own with an empty tmpfs over that folder,
    so its processes cannot see what the driver writes there, as a node without the shared mount
    would not (``unshare -m``; needs root, which this machine and CI have).
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="segr1-node-", dir="/tmp"))
    command = [sys.executable, str(REPO / "tests" / "ray_node.py"), head.gcs_address, str(num_cpus),
               json.dumps(resources), str(temp_dir)]
    if hide is not None:
        hide.mkdir(parents=True, exist_ok=True)
        script = f"mount -t tmpfs segr1-hidden {shlex.quote(str(hide))} && exec {shlex.join(command)}"
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    log_path = temp_dir / "node.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=head.client_env(), cwd=temp_dir, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    node = RayNode(process, temp_dir, log_path)
    deadline = time.monotonic() + timeout_s
    while "Ray runtime started" not in log_path.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            text = log_path.read_text()[-4000:]
            node.stop()
            raise RuntimeError(f"worker node did not start:\n{text}")
        time.sleep(0.5)
    return node


def _wait_ready(head: RayHead, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.process.returncode}:\n{head.log_path.read_text()[-4000:]}")
        started = "Ray runtime started" in head.log_path.read_text()
        try:
            status, _ = head.http_get("/api/jobs/")
        except OSError:
            status = None
        if started and status == 200:
            return
        time.sleep(1)
    raise TimeoutError(f"Ray head not ready after {timeout_s:g} s:\n{head.log_path.read_text()[-4000:]}")
