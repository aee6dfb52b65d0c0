"""The training job end to end on CPU: the tiny preset through real vLLM, SAM2, DeepSpeed and Ray.

In-process tests build the job on the session's Ray cluster so they can look inside it (weights,
pools); tests/test_multinode.py submits ``python -m segr1.run`` with ``ray job submit``, kills,
stops and resumes it, as a user would.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import threading
from pathlib import Path

import pytest
import ray

from actors.rollout import SamplingSettings
from segr1.config import load_config
from segr1.core.schema import TrainSample
from segr1.train.job import build_job
from segr1.weightsync.rendezvous import RendezvousRefused, RendezvousStore

pytestmark = pytest.mark.slow

# Entropy regularisation gives every step a non-zero gradient whatever the rewards of its groups:
# that is what makes "the engines hold the learner's weights" a real check.
MOVING = ["--grpo.entropy_coef", "0.5", "--learner.lr", "1e-3"]


# These tests check the job's plumbing, not learning (tests/test_learning.py does): the random tiny
# policy with the old 48-token answers keeps each step as short as it can be.
RANDOM_POLICY = ["--model.path", "tiny", "--rollout.max_tokens", "48"]


def tiny_config(out_dir: Path, *overrides: str):
    return load_config("tiny", ["--trainer.output_dir", str(out_dir), "--trainer.eval_every", "0", *RANDOM_POLICY,
                                *overrides])


def metric_lines(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sync_job_trains_and_engines_hold_the_learners_weights(ray_cluster, tmp_path):
    """Also: while it trains, none of its processes listens beyond loopback, and a client without
    the job's secret is refused by both rendezvous stores while the job goes on."""
    config = tiny_config(tmp_path, "--trainer.steps", "2", "--trainer.eval_every", "2", "--trainer.sample_every", "2",
                         *MOVING)
    job = build_job(config, tmp_path)
    try:
        digest_before = job.learner.weights_digest()
        with PortWatch(job, tmp_path) as ports:
            job.trainer.fit()
        ports.check()
        assert job.learner.weights_digest() != digest_before

        prompt = job.trainer.source.next(1)[0].item
        (group,) = job.rollout.generate([prompt], SamplingSettings(n=2, max_tokens=16, seed=7))
        assert group.weight_version == 2
        samples = [
            TrainSample(group.group_id, prompt.prompt, prompt.image, c.token_ids, c.logprobs, 0.0, 2)
            for c in group.completions
        ]
        learner_logprobs = job.learner.compute_logprobs(samples)
        for completion, theirs in zip(group.completions, learner_logprobs):
            assert max(abs(a - b) for a, b in zip(completion.logprobs, theirs)) < 1e-4
    finally:
        job.shutdown()

    lines = metric_lines(tmp_path)
    train = [line for line in lines if "reward" in line]
    assert [line["step"] for line in train] == [1, 2]  # the job went on after the knocks
    assert [line["weight_version"] for line in train] == [1, 2]
    assert all(line["staleness"] == 0 for line in train)
    assert all(line["entropy"] > 0 and line["grad_norm"] > 0 for line in train)
    assert any("eval_reward" in line for line in lines)
    assert (tmp_path / "checkpoints" / "step_2").is_dir()
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert (tmp_path / "config.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "samples" / "step_000002").iterdir()) == ["0.png", "1.png", "samples.json"]


def test_a_run_on_s3_checkpoints_exports_and_resumes_there(ray_cluster, s3_uri):
    """trainer.output_dir as a URI: checkpoints and the export go to the bucket, the driver's logs
    are uploaded beside them, and a resume (with no local files) continues from the bucket."""
    from segr1.runtime.storage import Storage

    run = Storage(s3_uri).child("job")
    for steps in ("2", "3"):
        config = tiny_config(run.location, "--trainer.steps", steps, "--trainer.resume", "true")
        job = build_job(config, config.trainer.output_dir)
        try:
            job.trainer.resume()
            job.trainer.fit()
        finally:
            job.shutdown()
        Path(job.monitor.out_dir / "metrics.jsonl").unlink()  # a resume must not rely on the local mirror
    assert run.read_text("checkpoints/latest").strip() == "step_3"
    assert run.exists("export/model.safetensors") and run.exists("export/processor_config.json")
    train = [json.loads(line) for line in run.read_text("metrics.jsonl").splitlines()]
    assert [line["step"] for line in train if "reward" in line] == [1, 2, 3]
    assert run.exists("tensorboard") and "output_dir: s3://" in run.read_text("config.yaml")
    assert run.exists("reward_curve.png") and run.exists("logs/driver.log")  # uploaded with the other logs


def listening(pids: dict[str, int]) -> dict[str, set[tuple[str, int]]]:
    """The LISTEN sockets of each named process."""
    import psutil

    found = {}
    for name, pid in pids.items():
        conns = psutil.Process(pid).net_connections(kind="inet")
        found[name] = {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return found


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1, as Ray's dual-stack servers bind
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def knock(host: str, port: int) -> BaseException | None:
    """Try to join a store without the job's secret; returns what the attempt raised."""
    try:
        RendezvousStore(host, port, "not-the-job-secret", datetime.timedelta(seconds=10))
    except BaseException as exc:  # noqa: BLE001 - the test asserts on it
        return exc
    return None


class PortWatch:
    """While a job trains: every 0.2 s the LISTEN sockets of its processes (driver, learner-0,
    rollout-0, reward-0), and once its first step is logged, one attempt to join each of its two
    rendezvous stores without the job's secret."""

    def __init__(self, job, out_dir: Path) -> None:
        self.pids = {name: ray.get(ray.get_actor(name).__ray_call__.remote(lambda _: os.getpid()))
                     for name in ("learner-0", "rollout-0", "reward-0")}
        self.pids["driver"] = os.getpid()
        self.stores = [job.trainer.weights.address, tuple(ray.get(job.learner.workers[0].__ray_call__.remote(
            lambda worker: (worker._rendezvous.host, worker._rendezvous.port))))]
        self.seen: dict[str, set[tuple[str, int]]] = {name: set() for name in self.pids}
        self.knocks: list[BaseException | None] = []
        self._out_dir = out_dir
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> PortWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(10)

    def _watch(self) -> None:
        while not self._done.is_set():
            for name, addrs in listening(self.pids).items():
                self.seen[name] |= addrs
            if not self.knocks and metric_lines(self._out_dir):
                self.knocks.extend(knock(*store) for store in self.stores)
            self._done.wait(0.2)

    def check(self) -> None:
        """Refused with the clear message on the client's side; nothing listened beyond loopback."""
        assert len(self.knocks) == 2
        for (host, port), refused in zip(self.stores, self.knocks):
            assert isinstance(refused, RendezvousRefused), refused
            assert f"{host}:{port} refused this client: wrong or missing job secret" in str(refused)
        beyond = {name: {a for a in addrs if not is_loopback(a[0])} for name, addrs in self.seen.items()}
        assert beyond == {name: set() for name in self.pids}, beyond
        assert set(self.stores) <= self.seen["learner-0"]  # the watcher did see the stores
