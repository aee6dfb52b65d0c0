"""One learner rank: a DeepSpeed engine over the Qwen2.5-VL policy (and a frozen reference).

``LearnerGroup`` runs one ``LearnerWorker`` per GPU as a Ray actor; ``segr1.train.sft`` runs a single
one in-process. Every public method that touches the model is collective: all ranks of the
group call it with their share of the work, and they take the same number of forward and
backward passes (fillers included, see ``plan_micro_batches``) because under ZeRO-3 each pass
gathers parameters from every rank.

The loss of a micro-batch is multiplied by its share of the batch objective and by the world
size before ``backward``: DeepSpeed averages gradients over ranks, so the optimizer sees the
gradient of the batch loss in one piece, independent of how the batch was split. Gradient
accumulation boundaries are set by hand (the number of micro-batches depends on the batch).

Heavy imports (DeepSpeed, transformers) happen inside the methods, so the driver can import
``LearnerSettings`` without them.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from learner import checkpoint as ckpt
from learner.export import export_hf, full_parameters, parameter_metas, weights_digest
from learner.inputs import (
    MicroBatch,
    ModelBatch,
    PromptCache,
    Sampled,
    collate,
    completion_logits,
    load_processor,
)
from segr1.core.grpo import LossSettings, aggregate, grpo_loss
from segr1.core.merge import deep_merge
from segr1.core.policy import ModelSettings
from segr1.runtime.deadlines import hang_if_switched
from segr1.runtime.ray_cluster import node_ip
from segr1.runtime.storage import Storage, clear_local
from segr1.weightsync.weight_sync import tensor_places

LR_SCHEDULES = ("constant", "cosine")

# The largest |learner - engine| log-prob of a sampled token, before the step's update: about 0 when
# the engines hold the learner's weights (staleness 0), so a broken weight sync shows at once.
GAP = "logprob_gap_max"


@dataclass(frozen=True)
class LearnerSettings:
    """The learner role (the job's ``learner`` section); ``LearnerRun`` adds the policy and the loss.

    ``deepspeed_config`` (a JSON file, or its content as a dict) is merged over the generated
    DeepSpeed config, its values winning. ``LearnerGroup`` reads a file on the driver, so the ranks
    need not see the path. The learning rate rises linearly over ``warmup_steps``, then stays at
    ``lr`` (``lr_schedule="constant"``) or follows a half cosine down to ``min_lr_ratio x lr`` at
    the run's last optimizer step (``"cosine"``, ``LearnerRun.decay_steps``).
    """

    num_workers: int = 1
    num_gpus_per_worker: int = 1
    num_cpus_per_worker: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 2
    deepspeed_config: str | dict | None = None
    lr: float = 1e-6
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 4
    iterations_per_batch: int = 1
    gradient_checkpointing: bool = True
    freeze_vision: bool = False
    sync_bucket_mb: int = 256
    prompt_cache_groups: int = 64
    step_deadline_s: float = 3600.0  # a learner step's deadline: this, plus the next per sample
    step_deadline_per_sample_s: float = 10.0

    def __post_init__(self) -> None:
        checks = [
            (self.num_workers >= 1, "num_workers must be >= 1"),
            (self.zero_stage in (0, 1, 2, 3), "zero_stage must be 0, 1, 2 or 3"),
            (self.lr > 0, "lr must be > 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 turns clipping off)"),
            (self.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
            (self.iterations_per_batch >= 1, "iterations_per_batch must be >= 1"),
            (self.sync_bucket_mb >= 1, "sync_bucket_mb must be >= 1"),
            (self.step_deadline_s > 0, "step_deadline_s must be > 0"),
            (self.step_deadline_per_sample_s >= 0, "step_deadline_per_sample_s must be >= 0"),
            (self.prompt_cache_groups >= 1, "prompt_cache_groups must be >= 1"),
        ]
        failed = [message for ok, message in checks if not ok]
        if failed:
            raise ValueError("LearnerSettings: " + "; ".join(failed))
        if isinstance(self.deepspeed_config, str) and not Path(self.deepspeed_config).is_file():
            raise ValueError(f"LearnerSettings: deepspeed_config {self.deepspeed_config} is not a file")


@dataclass(frozen=True)
class LearnerRun:
    """What a run gives the learner besides its settings: the policy, the loss (the job's ``grpo``
    section), the seed, ``decay_steps``, the run's optimizer steps (where a cosine ends), and the
    rollout's sampling ``temperature``, whose distribution the log-probs describe."""

    model: ModelSettings
    loss: LossSettings = field(default_factory=LossSettings)
    seed: int = 0
    decay_steps: int | None = None
    temperature: float = 1.0

    def check(self, settings: LearnerSettings) -> None:
        if not isinstance(self.loss, LossSettings):
            raise TypeError(f"LearnerRun.loss must be a segr1.core.grpo.LossSettings, got {type(self.loss).__name__}")
        if settings.lr_schedule == "cosine" and not (self.decay_steps or 0) > settings.warmup_steps:
            raise ValueError(f"lr_schedule 'cosine' needs decay_steps > warmup_steps ({settings.warmup_steps}), "
                             f"got {self.decay_steps}")


def lr_factor(step: int, settings: LearnerSettings, decay_steps: int | None) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of ``settings.lr``.

    Written out rather than taken from transformers, whose cosine turns back up after its horizon:
    here the rate holds at the floor, so a run resumed past ``decay_steps`` never speeds up again.
    """
    warmup = settings.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if settings.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup + 1) / (decay_steps - warmup))
    floor = settings.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def read_deepspeed_overrides(source: str | dict | None) -> dict:
    """The user's DeepSpeed overrides: a dict as given, or the JSON object in a file."""
    if source is None or isinstance(source, dict):
        return dict(source or {})
    try:
        data = json.loads(Path(source).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"deepspeed_config {source}: unreadable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"deepspeed_config {source}: must hold a JSON object, got {type(data).__name__}")
    return data


def deepspeed_config(settings: LearnerSettings, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed config of the policy engine, with the user's JSON file merged over it.

    ``gradient_accumulation_steps`` is 1 here only to satisfy DeepSpeed's batch arithmetic: the
    worker marks accumulation boundaries itself, since the number of micro-batches per step
    follows the batch it is given.
    """
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": settings.micro_batch_size * world_size,
        "gradient_clipping": settings.grad_clip,
        "zero_optimization": {"stage": settings.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, read_deepspeed_overrides(settings.deepspeed_config))


def reference_config(policy_config: dict) -> dict:
    """The frozen reference's engine: ZeRO-3 partitions it like the policy, other stages replicate it."""
    zero3 = policy_config["zero_optimization"].get("stage") == 3
    return {
        "train_micro_batch_size_per_gpu": policy_config["train_micro_batch_size_per_gpu"],
        "train_batch_size": policy_config["train_batch_size"],
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3 if zero3 else 0},
        "bf16": dict(policy_config.get("bf16", {"enabled": False})),
        "steps_per_print": 1 << 30,
    }


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _bind_gloo_to(address: str) -> None:
    """Make gloo's default devices (the default group's and every later ``new_group``'s) listen on
    the interface holding ``address``, not wherever the hostname resolves to.

    Gloo reads ``GLOO_SOCKET_IFNAME`` at each group's creation and binds that interface's first
    address; a value the user set is kept (they chose the interface).
    """
    import psutil

    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == address for a in addrs):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return
    raise ValueError(f"no network interface holds this node's address {address}; set GLOO_SOCKET_IFNAME")


def _actor_name(outside_ray: str) -> str:
    import ray

    return (ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None) or outside_ray


class LearnerWorker:
    """One rank of the learner; plain class, wrapped as a Ray actor by ``LearnerGroup``."""

    def __init__(self, settings: LearnerSettings, run: LearnerRun, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a learner of {world_size} ranks")
        run.check(settings)
        self.settings = settings
        self.run = run
        self.rank = rank
        self._actor_name = _actor_name(f"learner-{rank}")  # the fault switch's name for this rank
        self.world_size = world_size
        self.engine: Any = None
        self.reference: Any = None
        self.processor: Any = None
        self.sampled = Sampled()  # the engines' distribution, known once the policy is built
        self.cache: PromptCache | None = None
        self.sender: Any = None
        self._rendezvous: Any = None  # rank 0: the server of the group's store
        self._store: Any = None  # referenced for as long as the default group uses it
        self._secret: str | None = None

    # ------------------------------------------------------------------ set-up

    def master_address(self, secret: str) -> tuple[str, int]:
        """Rank 0: serve the group's rendezvous on this node's address; returns (host, port).

        The store (``segr1.weightsync.rendezvous``) listens on that address only, at a port the OS picks,
        and admits the ranks that prove ``secret``, the job's. It stays up until ``shutdown``:
        the groups DeepSpeed creates later (``new_group``) form through it too.
        """
        from segr1.weightsync.rendezvous import RendezvousServer

        self._rendezvous = RendezvousServer(node_ip(), secret)
        return self._rendezvous.host, self._rendezvous.port

    def setup(self, master_addr: str, master_port: int, secret: str) -> dict[str, Any]:
        """Join the process group through rank 0's rendezvous and build the engines; returns a
        short description.

        The default group is formed here, over a store that asks for ``secret``; DeepSpeed's
        ``init_distributed`` then finds torch.distributed initialised and adopts that group, so
        nothing opens a ``TCPStore`` (which listens on every interface). Rank 0 keeps the secret
        for its weight sender.
        """
        import deepspeed
        from deepspeed.constants import default_pg_timeout

        from segr1.weightsync.rendezvous import RendezvousStore

        on_gpu = torch.cuda.is_available()
        backend = "nccl" if on_gpu else "gloo"
        # Read by DeepSpeed: ranks for its logging, MASTER_* to name its shared-memory segments.
        os.environ.update({
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": "0",
        })
        options: dict[str, Any] = {}
        if on_gpu:
            torch.cuda.set_device(0)  # Ray shows each actor only its own GPU
            if self.world_size > 1:  # as DeepSpeed's own init does: bind the group to the device
                options["device_id"] = torch.device("cuda", 0)
        _bind_gloo_to(node_ip())
        self._secret = secret
        self._store = RendezvousStore(master_addr, master_port, secret, default_pg_timeout)
        torch.distributed.init_process_group(
            backend, store=self._store, rank=self.rank, world_size=self.world_size, timeout=default_pg_timeout,
            **options,
        )
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        _seed_everything(self.run.seed)
        self.device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        self.bf16 = self.run.model.bf16 and (not on_gpu or torch.cuda.is_bf16_supported())
        self.ds_config = deepspeed_config(self.settings, self.world_size, self.bf16)
        self.zero3 = self.ds_config["zero_optimization"].get("stage") == 3
        self._build_policy()
        if self.run.loss.kl_coef > 0:
            self._build_reference()
        return {"rank": self.rank, "device": str(self.device), "bf16": self.bf16, "zero3": self.zero3}

    def _load_model(self) -> torch.nn.Module:
        """The whole model on every rank; ``deepspeed.initialize`` partitions it under ZeRO-3.

        Loading straight into partitions (``HfDeepSpeedConfig`` + ``zero.Init``) would need the
        ``accelerate`` package; a full copy per rank in host memory is the price of going without.
        """
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(
            self.run.model.path, dtype=torch.bfloat16 if self.bf16 else torch.float32
        )
        model.config.use_cache = False
        return model

    def _build_policy(self) -> None:
        import deepspeed

        self.processor = load_processor(self.run.model.path, self.run.model.min_pixels, self.run.model.max_pixels)
        self.cache = PromptCache(self.processor, self.settings.prompt_cache_groups)
        model = self._load_model()
        self.sampled = Sampled.of(self.processor, model.config, self.run.temperature)
        if self.settings.freeze_vision:
            model.model.visual.requires_grad_(False)
        if self.settings.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = torch.optim.AdamW(
            self._param_groups(model), lr=self.settings.lr, betas=(0.9, 0.999), eps=1e-8
        )
        schedule = functools.partial(lr_factor, settings=self.settings, decay_steps=self.run.decay_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self.engine.train()

    def _param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """Weight decay on matrices only: decaying norms and biases pulls them toward zero for nothing."""
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            shape = param.ds_shape if hasattr(param, "ds_shape") else param.shape
            (decay if len(shape) >= 2 and not name.endswith("bias") else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": self.settings.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def _build_reference(self) -> None:
        import deepspeed

        model = self._load_model()
        model.requires_grad_(False)
        model.eval()
        self.reference, _, _, _ = deepspeed.initialize(model=model, config=reference_config(self.ds_config))
        self.reference.eval()

    # ------------------------------------------------------------------ forward passes

    def _batch(self, micro: MicroBatch) -> ModelBatch:
        assert self.cache is not None
        prompts = [self.cache.get(s) for s in micro.samples]
        weights = [0.0] * len(micro.samples) if micro.is_filler else None  # a filler counts no tokens
        return collate(micro.samples, prompts, self.processor.tokenizer.pad_token_id, weights).to(self.device)

    def _batches(self, micro_batches: list[MicroBatch]) -> list[ModelBatch]:
        """Every micro-batch's inputs, or on every rank one error that names the refused groups.

        A rank that raised alone would leave the others blocked in their next pass (under ZeRO-3
        each forward gathers parameters from all ranks), so the ranks share their verdicts first.
        """
        batches: list[ModelBatch] = []
        cause: Exception | None = None
        try:
            batches = [self._batch(micro) for micro in micro_batches]
        except Exception as exc:  # noqa: BLE001 - raised below on every rank, this one's as the cause
            cause = exc
        verdicts: list[str | None] = [None] * self.world_size
        torch.distributed.all_gather_object(verdicts, None if cause is None else f"learner rank {self.rank}: {cause}")
        refused = [v for v in verdicts if v is not None]
        if refused:
            raise ValueError("; ".join(refused)) from cause
        return batches

    def _reference_logprobs(self, batch: ModelBatch) -> torch.Tensor | None:
        if self.reference is None:
            return None
        with torch.no_grad():
            return self.sampled.logprobs(completion_logits(self.reference, batch), batch.completion_ids)

    def compute_logprobs(self, micro_batches: list[MicroBatch]) -> list[tuple[int, list[float]]]:
        """The policy's log-prob of every completion token, as (caller index, log-probs) pairs."""
        self.engine.eval()
        out: list[tuple[int, list[float]]] = []
        try:
            with torch.no_grad():
                for micro, batch in zip(micro_batches, self._batches(micro_batches)):
                    logp = self.sampled.logprobs(completion_logits(self.engine, batch), batch.completion_ids).cpu()
                    for row, index in enumerate(micro.indices):
                        n = len(micro.samples[row].completion_ids)
                        out.append((index, logp[row, :n].tolist()))
        finally:
            self.engine.train()
        return out

    def _micro_loss(
        self, micro: MicroBatch, batch: ModelBatch, ref_logp: torch.Tensor | None, objective: str
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logp, entropy = self.sampled.logprobs_and_entropy(completion_logits(self.engine, batch), batch.completion_ids)
        if micro.is_filler:
            # Same passes as the other ranks, no contribution: the gradient of 0 x logp is zero.
            return logp.sum() * 0.0, {}
        mask = batch.completion_mask
        loss_settings = self.run.loss
        if objective == "sft" or loss_settings.entropy_coef == 0:
            entropy = entropy.detach()  # a metric only: no gradient through it
        if objective == "sft":
            loss = -aggregate(logp, mask, "token_mean")
            return loss, {"loss": loss.item(), "entropy": aggregate(entropy, mask, "token_mean").item()}
        loss, metrics = grpo_loss(logp, batch.behavior_logprobs, ref_logp, batch.advantages, mask, loss_settings,
                                  entropy)
        metrics[GAP] = float(((logp.detach() - batch.behavior_logprobs).abs() * mask).max())
        return loss, metrics

    def train_step(self, micro_batches: list[MicroBatch], objective: str = "grpo") -> dict[str, float]:
        """``iterations_per_batch`` optimizer steps over this rank's micro-batches.

        Returns this rank's sums: every metric weighted by its micro-batch's share (the group adds
        the ranks up), plus token counts and the wall time.
        """
        if objective not in ("grpo", "sft"):
            raise ValueError(f"unknown objective {objective!r}; expected 'grpo' or 'sft'")
        hang_if_switched(self._actor_name, "train_step")
        start = time.perf_counter()
        batches = self._batches(micro_batches)
        refs = [self._reference_logprobs(b) if objective == "grpo" else None for b in batches]
        iterations = self.settings.iterations_per_batch if objective == "grpo" else 1
        sums: dict[str, float] = {}
        gap = 0.0
        grad_norm = lr = float("nan")
        for iteration in range(iterations):
            for i, (micro, batch, ref) in enumerate(zip(micro_batches, batches, refs)):
                self.engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
                loss, metrics = self._micro_loss(micro, batch, ref, objective)
                self.engine.backward(loss * (micro.share * self.world_size), scale_wrt_gas=False)
                if iteration == 0:  # before this batch moved the weights: the engines' and the learner's
                    gap = max(gap, metrics.get(GAP, 0.0))
                metrics.pop(GAP, None)
                for name, value in metrics.items():
                    sums[name] = sums.get(name, 0.0) + micro.share * value / iterations
            lr = float(self.engine.get_lr()[0])  # this step's rate: step() moves the schedule on
            self.engine.step()
            norm = self.engine.get_global_grad_norm()  # before clipping
            grad_norm = float(norm) if norm is not None else float("nan")
        tokens = sum(b.num_tokens for b in batches) * iterations  # fillers weigh 0: real samples only
        completion = sum(b.completion_mask.sum().item() for m, b in zip(micro_batches, batches) if not m.is_filler)
        return {
            **sums,
            **({GAP: gap} if objective == "grpo" else {}),
            "grad_norm": grad_norm,
            "tokens": float(tokens),
            "completion_tokens": float(completion),
            "seconds": time.perf_counter() - start,
            "lr": lr,
            "optimizer_steps": float(self.engine.global_steps),
        }

    # ------------------------------------------------------------------ weights out

    def weights_digest(self, prefix: str = "") -> str:
        """SHA-256 of the full weights whose names start with ``prefix`` (collective under ZeRO-3)."""
        return weights_digest(self.engine.module, self.zero3, prefix)

    def export_hf(self, location: str) -> str:
        """Write a Hugging Face directory of the current policy to ``location`` (a path or URI; rank 0
        writes, all ranks gather). The processor goes with it, with the image bounds of this run."""
        target = Storage(location)
        local = target.path() if target.is_local else target.staging_dir("export")
        export_hf(self.engine.module, self.processor, local, self.zero3, write=self.rank == 0)
        if self.rank == 0 and not target.is_local:
            parent, name = target.parent()
            parent.upload(local, ckpt.tmp_name(name))
            parent.move(ckpt.tmp_name(name), name)
            clear_local(local)
        torch.distributed.barrier()
        return target.location

    def weight_sync_address(self) -> tuple[str, int]:
        """Rank 0: the rendezvous the rollout engines join (a fresh one after each join)."""
        return self._sender().address()

    def init_weight_sync(self, host: str, port: int, world_size: int) -> dict:
        """Rank 0: form the weight group at ``host:port`` (blocks until all ``world_size`` ranks join).

        Returns the bucket plan (JSON) the receivers need for every following ``broadcast_weights``.
        """
        sender = self._sender()
        if (host, int(port)) != sender.address():
            raise ValueError(f"init_weight_sync({host}:{port}) does not match the sender's {sender.address()}")
        sender.join(world_size)
        return self.weight_plan()

    def weight_plan(self) -> dict:
        """Rank 0: the bucket plan of every sync (names, shapes, dtypes, offsets).

        Below ZeRO-3 the parameters are the learner's own memory (ZeRO-1/2: views of DeepSpeed's
        flat buffer of each parameter group), so the plan lays them out as they lie and the push
        sends that memory as it is; ZeRO-3's gathered parameters are copied as they arrive."""
        module = self.engine.module
        places = None if self.zero3 else tensor_places((n, p.detach()) for n, p in module.named_parameters())
        return self._sender().plan(parameter_metas(module), places).to_json()

    def broadcast_weights(self, version: int) -> dict[str, int]:
        """All ranks: gather (ZeRO-3) while rank 0 streams the weights to the rollout engines.

        Returns rank 0's ``bytes`` sent and how many of them it first ``staged`` (copied into a
        send buffer); zeros on the other ranks.
        """
        chunk = self.settings.sync_bucket_mb << 20
        tensors = full_parameters(self.engine.module, self.zero3, chunk)
        if self.rank != 0:
            for _ in tensors:  # take part in every gather, in the same order as rank 0
                pass
            return {"bytes": 0, "staged": 0}
        sent = self._sender().send(tensors, version, in_place=not self.zero3)
        return {"bytes": sent.bytes, "staged": sent.staged}

    def _sender(self):
        if self.rank != 0:
            raise RuntimeError(f"rank {self.rank}: only learner rank 0 sends weights")
        if self.sender is None:
            from learner.weight_sender import WeightSender

            self.sender = WeightSender(bucket_bytes=self.settings.sync_bucket_mb << 20, secret=self._secret)
        return self.sender

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, location: str, name: str) -> None:
        """All ranks: write engine states and this rank's RNG as ``name.tmp`` under ``location``.

        On a path every rank writes into the same folder; on a URI each rank writes a local
        staging folder of its own and uploads it. Rank 0 publishes afterwards."""
        root = Storage(location)
        tmp = ckpt.tmp_name(name)
        local = root.staging_dir(tmp if root.is_local else f"{tmp}.rank{self.rank}")
        if self.rank == 0:
            root.delete(tmp)  # left by a save that crashed: its files may not match this world size
        if not root.is_local:
            clear_local(local)
        torch.distributed.barrier()
        self.engine.save_checkpoint(str(local), tag=ckpt.DEEPSPEED_TAG, client_state={}, save_latest=False)
        ckpt.save_rng(local, self.rank)
        if not root.is_local:
            root.upload(local, tmp)
            clear_local(local)
        torch.distributed.barrier()

    def publish_checkpoint(self, location: str, name: str, client_state: dict) -> str:
        """Rank 0, after every rank saved: add the caller's state and publish atomically."""
        return ckpt.publish(Storage(location), name, client_state)

    def latest_checkpoint(self, location: str) -> str | None:
        """Rank 0: the step directory ``latest`` names under ``location``, as this node sees it."""
        return ckpt.latest(Storage(location))

    def load_checkpoint(self, location: str, name: str) -> dict:
        """All ranks: restore module, optimizer, scheduler and RNG from ``location/name``; returns
        the caller's state. On a URI each rank downloads only the files it reads."""
        root = Storage(location)
        path = root.staging_dir(name if root.is_local else f"{name}.rank{self.rank}")
        if not root.is_local:
            clear_local(path)
            root.download(name, path, keep=lambda relative: ckpt.rank_needs(relative, self.rank))
        loaded, _ = self.engine.load_checkpoint(
            str(path), tag=ckpt.DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise ckpt.CheckpointError(f"{root.path(name)}: DeepSpeed found no checkpoint to load")
        ckpt.load_rng(path, self.rank)
        if not root.is_local:
            clear_local(path)
        torch.distributed.barrier()
        return ckpt.read_client_state(root, name)

    def global_steps(self) -> int:
        return int(self.engine.global_steps)

    def shutdown(self) -> None:
        """Leave the process group and close the stores (lets a new group form in this process,
        e.g. after SFT)."""
        if self.sender is not None:
            self.sender.close()
            self.sender = None
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        if self._rendezvous is not None:
            self._rendezvous.close()
            self._rendezvous = None
        self._store = None

