"""The learner group: L ``LearnerWorker`` Ray actors in the learner's placement group, one DeepSpeed job.

The driver talks to the group as if it were one learner. Each call splits the work with
``plan_micro_batches`` (balanced by tokens, equal numbers of passes per rank), sends every rank
its part in one call, and combines what comes back::

    group = LearnerGroup(LearnerSettings(num_workers=2, zero_stage=3), LearnerRun(ModelSettings(path=...)))
    metrics = group.train_step(samples)          # loss, kl, clip_frac, entropy, grad_norm, tokens_per_s
    group.save_checkpoint("runs/x/checkpoints", {"step": 1, "weight_version": 1, "data": ...})
    group.shutdown()

Actors are named ``<name_prefix>-<rank>`` (``learner-0`` ...). Rank 0 serves the rendezvous
(on its node's address only, at a port the OS picks, open to holders of the group's secret) and
holds the weight sender.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from learner import checkpoint as ckpt
from learner.inputs import MicroBatch, plan_micro_batches
from learner.worker import GAP, LearnerRun, LearnerSettings, LearnerWorker, read_deepspeed_overrides
from segr1.core.schema import TrainSample
from segr1.runtime.deadlines import Deadline, call_deadline, get_within, with_fault_switch
from segr1.runtime.ray_cluster import RolePlacement, RoleRequest, node_ip, role_placement
from segr1.runtime.storage import Storage, StorageError
from segr1.weightsync.rendezvous import new_secret

# Metrics that are rank sums already weighted by micro-batch share (they add up to batch values).
_SHARE_WEIGHTED = ("loss", "pg_loss", "kl", "entropy", "clip_frac", "dual_clip_frac", "ratio_mean")


class LearnerGroup:
    """L learner ranks as Ray actors forming one torch.distributed group (NCCL on GPUs, gloo on CPU)."""

    def __init__(
        self,
        settings: LearnerSettings,
        run: LearnerRun,
        runtime_env: dict[str, Any] | None = None,
        placement: RolePlacement | None = None,
        name_prefix: str = "learner",
        use_gpu: bool | None = None,
        wait: bool = True,
    ) -> None:
        """``placement``: the learner's bundles from ``place_roles`` (the job's way, which the caller
        removes); without one the group reserves its own PACK group and removes it on shutdown.
        ``wait=False`` returns while the ranks set up (DeepSpeed, the model) so the caller can start
        the engines meanwhile, then calls ``ready()``; calls made before it queue behind the setup."""
        import ray

        if not ray.is_initialized():
            raise RuntimeError("LearnerGroup needs a running Ray (call ray.init first)")
        if isinstance(settings.deepspeed_config, str):  # read here: ranks on other nodes may not see the file
            settings = replace(settings, deepspeed_config=read_deepspeed_overrides(settings.deepspeed_config))
        run.check(settings)
        self.settings = settings
        self.run = run
        self.world_size = settings.num_workers
        if use_gpu is None:  # the paper's setup asks for GPUs; a CPU-only cluster runs the same job without
            use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        gpus = float(settings.num_gpus_per_worker) if use_gpu else 0.0
        request = RoleRequest("learner", self.world_size, float(settings.num_cpus_per_worker), gpus)
        if placement is not None and placement.request != request:
            raise ValueError(f"LearnerGroup: placement {placement.request} does not match the settings' {request}")
        self.name_prefix = name_prefix
        self._owned = placement is None
        self._placement = placement or role_placement(request)
        actor_cls = ray.remote(LearnerWorker)
        self.workers = [
            actor_cls.options(
                name=self.names[rank],
                num_cpus=settings.num_cpus_per_worker,
                num_gpus=gpus,
                scheduling_strategy=self._placement.scheduling_strategy(rank),
                runtime_env=with_fault_switch(runtime_env),
            ).remote(settings, run, rank, self.world_size)
            for rank in range(self.world_size)
        ]
        # The job's secret: DeepSpeed's store and the weight group's ask every member for it. It
        # travels only as arguments of Ray calls (never the environment, a command line or a log).
        self.secret = new_secret()
        try:
            addr, port = ray.get(self.workers[0].master_address.remote(self.secret))
        except Exception:
            self.shutdown()
            raise
        self._setting_up = [w.setup.remote(addr, port, self.secret) for w in self.workers]
        self.info: list[dict[str, Any]] = []
        self.weight_version = 0
        if wait:
            self.ready()

    def ready(self) -> None:
        """Wait until every rank has set up; on an error the ranks are shut down and it is raised."""
        import ray

        if self.info:
            return
        try:
            self.info = ray.get(self._setting_up)
        except Exception:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ helpers

    def _all(self, method: str, *args: Any) -> list[Any]:
        import ray

        return ray.get([getattr(w, method).remote(*args) for w in self.workers])

    def _each(self, method: str, per_rank: Sequence[Any], *args: Any, deadline: Deadline | None = None) -> list[Any]:
        refs = [getattr(w, method).remote(part, *args) for w, part in zip(self.workers, per_rank)]
        return get_within(list(zip(self.names, refs)), deadline, method)

    @property
    def names(self) -> list[str]:
        """The ranks' actor names, ``<name_prefix>-<rank>``."""
        return [f"{self.name_prefix}-{rank}" for rank in range(self.world_size)]

    def _step_deadline(self, samples: int) -> Deadline:
        s = self.settings
        return Deadline(call_deadline(s.step_deadline_s, s.step_deadline_per_sample_s, samples),
                        "learner.step_deadline_s + learner.step_deadline_per_sample_s per sample")

    def _plan(self, samples: Sequence[TrainSample], aggregation: str) -> list[list[MicroBatch]]:
        return plan_micro_batches(list(samples), self.world_size, self.settings.micro_batch_size, aggregation)

    # ------------------------------------------------------------------ training

    def train_step(self, samples: Sequence[TrainSample]) -> dict[str, float]:
        """One GRPO update (``iterations_per_batch`` optimizer steps) on ``samples``; batch metrics."""
        plans = self._plan(samples, self.run.loss.aggregation)
        return combine_metrics(self._each("train_step", plans, "grpo", deadline=self._step_deadline(len(samples))))

    def sft_step(self, samples: Sequence[TrainSample]) -> dict[str, float]:
        """One supervised step: mean negative log-likelihood of the completion (answer) tokens."""
        plans = self._plan(samples, "token_mean")
        return combine_metrics(self._each("train_step", plans, "sft", deadline=self._step_deadline(len(samples))))

    def compute_logprobs(self, samples: Sequence[TrainSample]) -> list[list[float]]:
        """The current policy's log-prob of each completion token, in the order of ``samples``."""
        plans = self._plan(samples, "token_mean")
        out: list[list[float] | None] = [None] * len(samples)
        for rank_result in self._each("compute_logprobs", plans):
            for index, logprobs in rank_result:
                out[index] = logprobs
        assert all(x is not None for x in out)
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ weights

    def weights_digest(self, prefix: str = "") -> str:
        """SHA-256 of the policy weights named ``prefix...`` (bit-identical weights give equal digests)."""
        digests = set(self._all("weights_digest", prefix))
        if len(digests) != 1:
            raise RuntimeError(f"learner ranks disagree on the weights: {sorted(digests)}")
        return digests.pop()

    def export_hf(self, location: str | Path) -> str:
        """Write the policy as a Hugging Face directory (safetensors, config, tokenizer, the processor
        with the run's image bounds) that transformers and vLLM load; a path or a URI."""
        return str(self._all("export_hf", Storage(location).location)[0])

    def weight_sync_address(self) -> tuple[str, int]:
        """Where the next weight group forms; its members prove ``self.secret`` there."""
        import ray

        return tuple(ray.get(self.workers[0].weight_sync_address.remote()))  # type: ignore[return-value]

    def init_weight_sync(self, host: str, port: int, world_size: int) -> dict:
        """Form the weight group (issue the rollout engines' joins first: this blocks until all join).

        Returns the bucket plan (JSON) every rollout engine needs to receive.
        """
        import ray

        return ray.get(self.workers[0].init_weight_sync.remote(host, port, world_size))

    def weight_plan(self) -> dict:
        import ray

        return ray.get(self.workers[0].weight_plan.remote())

    def broadcast_weights(
        self, version: int, receives: Sequence[tuple[str, Any]] = (), deadline: Deadline | None = None
    ) -> dict[str, int]:
        """Stream the weights as ``version``; returns the ``bytes`` sent and how many of them were
        ``staged`` (copied first). ``receives``: the engines' ``(name, ref)`` receive calls (issue
        them first), waited for with the send, all within ``deadline``.

        ``version`` may repeat the last one (a resumed job re-sends the restored version to fresh
        engines) but never go back.
        """
        if version < self.weight_version:
            raise ValueError(f"weight version must not go back: {version} after {self.weight_version}")
        sends = [(name, w.broadcast_weights.remote(version)) for name, w in zip(self.names, self.workers)]
        sent = get_within([*sends, *receives], deadline, f"weight push to version {version}")[0]
        self.weight_version = version
        return sent

    # ------------------------------------------------------------------ checkpoints

    def check_storage(self, location: str | Path) -> None:
        """Prove every rank's node reads what this process writes under ``location``; raise
        StorageError naming the location and the rank otherwise (call it before training, not after
        a day). It runs as a task in each rank's bundle, so it answers while the ranks still set up."""
        import ray

        storage = Storage(location)
        probe, token = storage.write_probe()
        check = ray.remote(num_cpus=0)(_check_probe)
        try:
            ray.get([
                check.options(scheduling_strategy=self._placement.scheduling_strategy(rank)).remote(
                    storage.location, probe, token, f"learner rank {rank}")
                for rank in range(self.world_size)
            ])
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, StorageError):
                raise StorageError(str(exc.cause)) from None
            raise
        finally:
            storage.delete(probe)

    def save_checkpoint(self, root: str | Path, client_state: dict[str, Any]) -> str:
        """Write ``root/step_N`` (N = ``client_state["step"]``, else the optimizer step count) atomically;
        ``root`` is a path every rank shares or a URI. Returns the step directory's location."""
        import ray

        location = Storage(root).location
        step = client_state.get("step")
        if step is None:
            step = ray.get(self.workers[0].global_steps.remote())
        name = ckpt.step_name(int(step))
        self._all("save_checkpoint", location, name)
        state = dict(client_state)
        state.setdefault("weight_version", self.weight_version)
        return str(ray.get(self.workers[0].publish_checkpoint.remote(location, name, state)))

    def load_checkpoint(self, root: str | Path) -> dict[str, Any] | None:
        """Restore the step ``root/latest`` names, as the ranks see ``root`` (the driver's disk may not
        hold it); None if there is none yet."""
        import ray

        location = Storage(root).location
        name = ray.get(self.workers[0].latest_checkpoint.remote(location))
        if name is None:
            return None
        state = self._all("load_checkpoint", location, name)[0]
        if "weight_version" in state:
            self.weight_version = int(state["weight_version"])
        return state

    def shutdown(self) -> None:
        import ray

        for worker in getattr(self, "workers", []):
            try:
                ray.kill(worker)
            except Exception:  # already dead: nothing to release
                pass
        self.workers = []
        if getattr(self, "_owned", False) and self._placement is not None:
            self._placement.remove()
        self._placement = None


def _check_probe(location: str, probe: str, token: str, who: str) -> None:
    """A task on a rank's node: read the driver's probe under ``location`` (or raise StorageError)."""
    Storage(location).check_probe(probe, token, who=f"{who} on node {node_ip()}")


def combine_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Batch metrics from the ranks' share-weighted sums; tokens per second over the slowest rank."""
    out: dict[str, float] = {}
    for name in _SHARE_WEIGHTED:
        values = [r[name] for r in per_rank if name in r]
        if values:
            out[name] = float(sum(values))
    gaps = [r[GAP] for r in per_rank if GAP in r]
    if gaps:
        out[GAP] = max(gaps)
    seconds = max(r["seconds"] for r in per_rank)
    tokens = sum(r["tokens"] for r in per_rank)
    out.update({
        "grad_norm": per_rank[0]["grad_norm"],
        "lr": per_rank[0]["lr"],
        "tokens": tokens,
        "completion_tokens": sum(r["completion_tokens"] for r in per_rank),
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
        "optimizer_steps": per_rank[0]["optimizer_steps"],
    })
    return out
