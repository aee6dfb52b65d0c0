"""Rollout actors: one vLLM engine each, G sampled completions per prompt, versioned weights.

``RolloutActor`` is a plain class (tests run it in-process); ``RolloutPool`` makes N Ray actors
of it, each in its own placement-group bundle, and spreads prompt batches over them through the
generic ``actors.pool.ActorPool`` (least-loaded dispatch, resubmission when an actor dies).

Weight sync, receiving side (see ``segr1/weightsync/weight_sync.py`` for the wire format): every engine
worker of every actor joins one group with the learner's rank 0 (``join_weight_group``); a sync
is one ``receive_weights(plan, version)`` call per actor, which runs on all of the engine's
workers via ``collective_rpc``, reloads through vLLM's own reloader and then resets the prefix,
multimodal and encoder caches (stale KV or vision embeddings would otherwise survive the load).
Generation and loading never interleave: a lock covers both, and as a Ray actor the calls are
serial anyway.

The behaviour log-probs returned are vLLM's default "raw" log-probs: log-softmax of the model's
logits over the full vocabulary, before temperature, top-p or the vision-token mask. That is
exactly what the learner computes for the same tokens, so the importance ratio is 1 when
weights match, and it is the distribution sampled only at temperature 1 and top-p 1: GRPO training
refuses other values (``segr1.config.validate``); evaluation samples as it likes.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import zlib
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from actors.pipeline import prompts_per_call
from actors.vision_ban import VISION_TOKEN_BAN
from actors.vllm_worker import quiet_known_vllm_noise
from segr1.core.frames import processor_bounds, processor_size
from segr1.core.policy import ModelSettings
from segr1.core.schema import Completion, PromptItem, RolloutGroup, rgb_image
from segr1.core.vocab import vision_token_ids
from segr1.runtime.deadlines import Deadline, DeadlineExceeded, get_within, hang_if_switched, with_fault_switch
from segr1.runtime.ray_cluster import node_ip
from segr1.weightsync.weight_sync import BucketPlan

log = logging.getLogger("segr1")

WORKER_EXTENSION = "actors.vllm_worker.WeightSyncWorkerExtension"



@dataclass(frozen=True)
class RolloutSettings:
    """The rollout role (the job's ``rollout`` section): how many engines, what each holds, and how
    training samples. The policy itself is ``ModelSettings``.

    On a cluster with GPUs each engine takes ``num_gpus_per_actor`` GPUs as its tensor-parallel
    size; on CPU one worker per engine with a ``kv_cache_memory_bytes`` cache (vLLM would otherwise
    reserve ~90% of RAM). ``group_size``, ``temperature``, ``top_p`` and ``max_tokens`` are the
    training samples' (``sampling()``); evaluation brings its own ``SamplingSettings``.
    """

    num_actors: int | Literal["auto"] = 1  # "auto": elastic, between min_actors and max_actors
    min_actors: int = 1
    max_actors: int = 8
    num_gpus_per_actor: int = 1
    num_cpus_per_actor: float = 1.0
    group_size: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 400
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.6  # GPU only
    kv_cache_memory_bytes: int = 1 << 30  # CPU only
    enforce_eager: bool = False
    max_restarts: int = 3
    max_in_flight_per_actor: int = 2
    weight_sync_timeout_s: float = 1800.0  # also the deadline of a weight push
    call_deadline_s: float = 600.0  # a generate call's deadline: this, plus the next per group
    call_deadline_per_group_s: float = 60.0

    def __post_init__(self) -> None:
        checks = [
            (self.num_actors == "auto" or (isinstance(self.num_actors, int) and self.num_actors >= 1),
             f"num_actors must be >= 1 or auto, got {self.num_actors}"),
            (1 <= self.min_actors <= self.max_actors,
             f"min_actors must be >= 1 and <= max_actors, got {self.min_actors} and {self.max_actors}"),
            (self.num_gpus_per_actor >= 1, f"num_gpus_per_actor must be >= 1 (it is the tensor-parallel size on "
             f"GPUs), got {self.num_gpus_per_actor}"),
            (self.num_cpus_per_actor > 0, f"num_cpus_per_actor must be > 0, got {self.num_cpus_per_actor}"),
            (self.group_size >= 1, f"group_size must be >= 1, got {self.group_size}"),
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.max_in_flight_per_actor >= 1, f"max_in_flight_per_actor must be >= 1, got {self.max_in_flight_per_actor}"),
            (self.weight_sync_timeout_s > 0, f"weight_sync_timeout_s must be > 0, got {self.weight_sync_timeout_s}"),
            (self.call_deadline_s > 0, f"call_deadline_s must be > 0, got {self.call_deadline_s}"),
            (self.call_deadline_per_group_s >= 0,
             f"call_deadline_per_group_s must be >= 0, got {self.call_deadline_per_group_s}"),
        ]
        failed = [message for ok, message in checks if not ok]
        if failed:
            raise ValueError("RolloutSettings: " + "; ".join(failed))

    @property
    def elastic(self) -> bool:
        """``num_actors: auto``: the job starts engines as the cluster gives room and loses them with their nodes."""
        return self.num_actors == "auto"

    @property
    def first_actors(self) -> int:
        """The engines a pool starts with: ``min_actors`` when elastic."""
        return self.min_actors if self.num_actors == "auto" else self.num_actors

    @property
    def most_actors(self) -> int:
        """The most engines there will be: ``max_actors`` when elastic."""
        return self.max_actors if self.num_actors == "auto" else self.num_actors

    def sampling(self) -> SamplingSettings:
        """How training samples: ``group_size`` completions per prompt."""
        return SamplingSettings(n=self.group_size, temperature=self.temperature, top_p=self.top_p,
                                max_tokens=self.max_tokens)


@dataclass(frozen=True)
class SamplingSettings:
    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 400
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError(f"sampling needs n >= 1 and max_tokens >= 1, got n={self.n}, max_tokens={self.max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"bad sampling temperature {self.temperature} or top_p {self.top_p}")


def item_seed(seed: int | None, group_id: str) -> int | None:
    """A per-prompt seed that does not depend on how prompts were batched over actors."""
    if seed is None:
        return None
    return (seed * 1_000_003 + zlib.crc32(group_id.encode())) % (1 << 31)


class RolloutActor:
    """Hosts one vLLM engine for the policy; use in-process or as ``ray.remote(RolloutActor)``."""

    def __init__(
        self, model: ModelSettings, settings: RolloutSettings, name: str = "rollout", seed: int = 0,
        tensor_parallel_size: int = 1,
    ) -> None:
        import torch

        self.model = model
        self.settings = settings
        self.seed = seed
        self.tensor_parallel_size = tensor_parallel_size
        self._name = name
        self._version = 0
        self._group: tuple[str, int, int] | None = None  # (host, port, world_size) last joined
        self._mixed_weights: str | None = None  # why sampling is refused after a failed sync
        self._lock = threading.Lock()
        self._on_gpu = torch.cuda.is_available()
        if not self._on_gpu:
            # In-process engine core: ~2 s and 1.3 GB to start instead of ~18 s and 3.4 GB, and
            # collective_rpc reaches the worker directly. Must be set before vLLM is imported.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        quiet_known_vllm_noise()  # before the engine starts: in-process, its worker logs here
        self.llm = LLM(**self._engine_kwargs())
        self._tokenizer = self.llm.get_tokenizer()
        hf_config = self.llm.llm_engine.model_config.hf_config
        self._vision_ids = vision_token_ids(self._tokenizer, hf_config)
        self._image_token_id = int(hf_config.image_token_id)
        vision = hf_config.vision_config
        self._frame_factor = int(vision.patch_size) * int(vision.spatial_merge_size)

    def _engine_kwargs(self) -> dict[str, Any]:
        s, tp = self.settings, self.tensor_parallel_size
        # The image bounds as vLLM's flat Qwen-VL aliases: given as the processor's `size`, vLLM 0.32
        # lets the checkpoint's own max_pixels win over a larger one (a 1024 px square seen at 84 px
        # under a checkpoint saved with 112 px bounds, where the driver expected 756).
        size = processor_size(self.model.min_pixels, self.model.max_pixels, checkpoint=self._checkpoint_bounds)
        bounds = {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]} if size else None
        kwargs: dict[str, Any] = dict(
            model=self.model.path,
            dtype=self.model.dtype,
            tensor_parallel_size=tp,
            max_model_len=s.max_model_len,
            seed=self.seed,
            enforce_eager=s.enforce_eager,
            limit_mm_per_prompt={"image": 1, "video": 0},
            mm_processor_kwargs=bounds,
            worker_extension_cls=WORKER_EXTENSION,
            logits_processors=[VISION_TOKEN_BAN],
            # The log-probs of the distribution sampled from (the ban and the temperature applied),
            # which the learner computes the same way: the importance ratio then compares like with like.
            logprobs_mode="processed_logprobs",
        )
        if self._on_gpu:
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
            if tp > 1:
                # Worker processes inside this actor, on the GPUs of its bundle. The "ray" backend
                # would try to place new GPU actors while this actor already holds the GPUs.
                kwargs["distributed_executor_backend"] = "mp"
        else:
            if tp != 1:
                raise ValueError("tensor_parallel_size > 1 needs GPUs; the CPU engine runs one worker")
            kwargs["kv_cache_memory_bytes"] = s.kv_cache_memory_bytes
            # Whole prefills only: a chunked one discards the token sampled for its unfinished part and
            # rewinds the request's seeded generator, which a CPU generator cannot do ("CPU Generator
            # does not use offset"): any call whose prompts pass 4096 tokens failed (2 prompts x 8 at 768 px).
            kwargs["enable_chunked_prefill"] = False
        return kwargs

    def _checkpoint_bounds(self) -> Any:
        from transformers import AutoImageProcessor

        return processor_bounds(AutoImageProcessor.from_pretrained(self.model.path))

    # ------------------------------------------------------------------ identity and state

    def name(self) -> str:
        return self._name

    def weight_version(self) -> int:
        return self._version

    def weight_group(self) -> tuple[str, int, int] | None:
        """The (host, port, world_size) of the weight group last joined; None after a restart."""
        return self._group

    def vision_token_ids(self) -> list[int]:
        return sorted(self._vision_ids)

    def shutdown(self) -> None:
        """Stop the engine and free its memory (on CPU nothing else frees it)."""
        self.llm.llm_engine.engine_core.shutdown()

    # ------------------------------------------------------------------ generation

    def generate(self, items: list[PromptItem], sampling: SamplingSettings) -> list[RolloutGroup]:
        """Sample ``sampling.n`` completions for each prompt; one RolloutGroup per item, in order."""
        from vllm import SamplingParams

        hang_if_switched(self._name, "generate")
        if self._mixed_weights is not None:
            raise RuntimeError(f"{self._name} refuses to sample: {self._mixed_weights}")
        if not items:
            return []
        images = _resolve_images(items)
        prompts = [
            {"prompt": item.prompt, "multi_modal_data": {"image": _to_pil(item, image)}}
            for item, image in zip(items, images)
        ]
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                seed=item_seed(sampling.seed, item.group_id),
                logprobs=0,  # the vision markup is banned by the engine's VisionTokenBan, for every request
                # The text is decoded below in one piece, so it is exactly the decode of the
                # tokens the learner trains on (incremental detokenizing can differ at the edges).
                detokenize=False,
            )
            for item in items
        ]
        with self._lock:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            version = self._version
        return [self._group_of(item, out, version) for item, out in zip(items, outputs)]

    def _group_of(self, item: PromptItem, out: Any, version: int) -> RolloutGroup:
        self._check_frame(item, out.prompt_token_ids)
        completions = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            ids = [int(t) for t in c.token_ids]
            if c.logprobs is None or len(c.logprobs) != len(ids):
                raise RuntimeError(f"group {item.group_id}: vLLM returned no log-prob for some tokens")
            logprobs = [float(pos[t].logprob) for pos, t in zip(c.logprobs, ids)]
            text = self._tokenizer.decode(ids, skip_special_tokens=True)
            completions.append(Completion(ids, text, logprobs, str(c.finish_reason)))
        return RolloutGroup(item, list(out.prompt_token_ids), completions, version, self._name)

    def _check_frame(self, item: PromptItem, prompt_ids: list[int]) -> None:
        """The engine resized the image to the prompt's ``policy_size``, or the answers would be
        read in another frame than the one the policy saw: its image tokens tell its grid."""
        width, height = item.policy_size
        expected = (width // self._frame_factor) * (height // self._frame_factor)
        seen = sum(1 for t in prompt_ids if t == self._image_token_id)
        if seen != expected:
            raise ValueError(
                f"record {item.record_id}: the engine turned the image into {seen} image tokens, but the "
                f"prompt's policy frame {width}x{height} means {expected}; the driver and the engines "
                "resize images with different min_pixels/max_pixels"
            )

    # ------------------------------------------------------------------ weight sync

    def join_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, secret: str) -> list[int]:
        """Join the learner's weight group (blocks until every rank has); returns this engine's ranks.

        ``secret``: the job's, which the group's store asks of every member (it is not kept here).
        """
        backend = "nccl" if self._on_gpu else "gloo"
        with self._lock:
            ranks = self.llm.collective_rpc(
                "segr1_join_weight_group",
                args=(host, int(port), int(rank_offset), int(world_size), backend, node_ip(),
                      float(self.settings.weight_sync_timeout_s), secret),
            )
            self._group = (host, int(port), int(world_size))
        return [int(r) for r in ranks]

    def receive_weights(self, plan: BucketPlan | dict, version: int) -> int:
        """Receive one sync from the learner into every worker, then drop all derived caches."""
        hang_if_switched(self._name, "receive_weights")
        if self._group is None:
            raise RuntimeError(f"{self._name}: receive_weights before join_weight_group")
        plan_json = plan.to_json() if isinstance(plan, BucketPlan) else plan
        with self._lock:
            try:
                self.llm.collective_rpc("segr1_receive_weights", args=(plan_json, int(version)))
            except Exception as exc:
                self._mixed_weights = (
                    f"the sync to version {version} failed part way ({exc}); its weights are a mix "
                    "of versions until a full sync succeeds"
                )
                raise
            finally:  # even a failed load may have replaced some weights
                self.llm.reset_prefix_cache()
                self.llm.reset_mm_cache()
                self.llm.llm_engine.reset_encoder_cache()
            self._mixed_weights = None
            self._version = int(version)
        return self._version


def _resolve_images(items: list[PromptItem]) -> list[Any]:
    """Fetch every ObjectRef among the items' images in one ``ray.get``; arrays pass through."""
    import ray

    refs = [i for i, item in enumerate(items) if isinstance(item.image, ray.ObjectRef)]
    images = [item.image for item in items]
    if refs:
        for i, value in zip(refs, ray.get([items[i].image for i in refs])):
            images[i] = value
    return images


def _to_pil(item: PromptItem, image: Any) -> Any:
    from PIL import Image

    return Image.fromarray(rgb_image(np.asarray(image), f"record {item.record_id}"))


class RolloutPool:
    """Rollout actors (``{prefix}-0``, ``{prefix}-1`` ...), each in a placement-group bundle of its own.

    Prompt batches go to the least-loaded actor; a batch whose actor dies is resubmitted to
    another (or to the restarted one). A restarted actor comes back at version 0 and outside
    the weight group: ``out_of_sync`` names it, and the driver re-forms the group (fresh
    address from the sender, new world size) and pushes the current weights to everyone.

    Elastic (``num_actors: auto``): each engine has a one-bundle placement group of its own and
    is never restarted (it goes with its node). The pool starts ``min_actors`` engines and always
    has one more placement asked for, up to ``max_actors``: a pending group is what the autoscaler
    adds a node for. ``refresh``, run before each weight push, drops the engines that died (their
    groups were already redone by the ``ActorPool``), starts an engine where the asked placement
    came free and admits those that have loaded; the push brings them to the current weights and
    ``open_admitted`` gives them work.
    """

    def __init__(
        self,
        model: ModelSettings,
        settings: RolloutSettings,
        *,
        seed: int = 0,
        placement: Any | None = None,
        use_gpu: bool | None = None,
        max_attempts: int | None = None,
        runtime_env: dict | None = None,
        name_prefix: str = "rollout",
    ) -> None:
        """``settings.first_actors`` engines of ``model``. ``placement``: the rollout role's
        ``segr1.runtime.ray_cluster.RolePlacement`` (one bundle per actor, each holding
        ``num_gpus_per_actor`` GPUs on GPU clusters); without one the pool places itself, asking for
        GPUs when the cluster has any (or as ``use_gpu`` says). An engine's tensor-parallel size is
        the GPUs of its bundle, 1 on CPU. An elastic pool always places itself."""
        import ray

        from actors.pool import ActorPool
        from segr1.runtime.ray_cluster import RoleRequest, role_placement

        self.model, self.settings, self.seed = model, settings, seed
        self.elastic = settings.elastic
        self._runtime_env = runtime_env
        self._name_prefix = name_prefix
        self._numbers = itertools.count()  # names are never reused: a dead engine's may still be taken
        self._placement_numbers = itertools.count()
        if placement is not None and self.elastic:
            raise ValueError("an elastic rollout pool (num_actors: auto) places each engine itself")
        if placement is None:
            if use_gpu is None:
                use_gpu = ray.cluster_resources().get("GPU", 0) > 0
            gpus = float(settings.num_gpus_per_actor) if use_gpu else 0.0
            self._request = RoleRequest("rollout", 1, settings.num_cpus_per_actor, gpus)  # one engine's
        self._owned: list[Any] = []  # the placements this pool made and removes
        self._slots: dict[str, tuple[Any, int]] = {}  # engine name -> (placement, bundle index)
        if self.elastic:
            slots = [(self._own(role_placement(self._request, name=self._placement_name())), 0)
                     for _ in range(settings.first_actors)]
        else:
            if placement is None:
                placement = self._own(role_placement(replace(self._request, count=settings.num_actors)))
            if len(placement.bundles) != settings.num_actors:
                raise ValueError(f"{settings.num_actors} rollout actors but the placement has "
                                 f"{len(placement.bundles)} bundles")
            slots = [(placement, i) for i in range(settings.num_actors)]
        gpus = slots[0][0].bundles[0].get("GPU", 0.0)
        # tp GPUs for a tensor-parallel engine; one engine alone may share a GPU (0 < gpus < 1)
        self.tensor_parallel_size = max(1, int(gpus))
        started = [self._start_engine(*slot) for slot in slots]
        self.names = [name for name, _ in started]
        self.actors = [actor for _, actor in started]
        attempts = {} if max_attempts is None else {"max_attempts": max_attempts}  # None: the pool's default
        self.pool = ActorPool(self.actors, self.names, settings.max_in_flight_per_actor, **attempts,
                              deadline_s=settings.call_deadline_s,
                              deadline_per_group_s=settings.call_deadline_per_group_s, drop_dead=self.elastic)
        self._loading: list[tuple[str, Any, Any]] = []  # elastic: (name, actor, ready ref) still starting
        self._admitted: list[tuple[str, Any]] = []  # elastic: in the weight group, not yet given work
        self._asked: Any = None  # elastic: the pending placement of the next engine
        if self.elastic:
            self._ask()

    def _own(self, placement: Any) -> Any:
        self._owned.append(placement)
        return placement

    def _placement_name(self) -> str:
        return f"segr1-{self._name_prefix}-{next(self._placement_numbers)}"

    def _start_engine(self, placement: Any, bundle: int) -> tuple[str, Any]:
        import ray

        name = f"{self._name_prefix}-{next(self._numbers)}"
        gpus = placement.bundles[bundle].get("GPU", 0.0)
        actor = ray.remote(RolloutActor).options(
            name=name,
            num_cpus=placement.bundles[bundle].get("CPU", 0.0),
            num_gpus=gpus,
            max_restarts=0 if self.elastic else self.settings.max_restarts,  # elastic: replaced, not restarted
            max_task_retries=0,  # the pool resubmits, so a call never runs twice behind its back
            runtime_env=actor_runtime_env(self._runtime_env, use_gpu=gpus > 0),
            scheduling_strategy=placement.scheduling_strategy(bundle),
        ).remote(self.model, self.settings, name, self.seed, self.tensor_parallel_size)
        self._slots[name] = (placement, bundle)
        return name, actor

    # ------------------------------------------------------------------ elastic engines

    @property
    def engines(self) -> int:
        """Engines that get work now."""
        return len(self.pool.live)

    def refresh(self, deadline: Deadline | None = None) -> None:
        """Elastic: drop the dead engines, start one where the asked placement came free, admit the
        ones that have loaded and ask for the next placement. It waits only when no engine is left
        (then until one has loaded, within ``deadline``)."""
        import time

        self._drop_dead(deadline)
        give_up = time.monotonic() + (deadline.seconds if deadline else float("inf"))
        while True:
            self._start_where_placed()
            self._admit_loaded()
            self._ask()
            if self.actors:
                return
            if time.monotonic() > give_up:
                assert deadline is not None
                raise DeadlineExceeded(
                    f"rollout: no engine left and none loaded within {deadline.seconds:.0f} s ({deadline.setting}); "
                    "the cluster has no room for one (rollout.num_cpus_per_actor, rollout.num_gpus_per_actor)"
                )
            time.sleep(1.0)

    def open_admitted(self) -> None:
        """Give work to the engines the last push brought to the current weights."""
        for name, actor in self._admitted:
            self.pool.add(actor, name)
            log.info("rollout: %s gets work (%d engines)", name, self.engines)
        self._admitted = []

    def _drop_dead(self, deadline: Deadline | None) -> None:
        """Forget the engines that died: those the pool retired, and those that do not answer a probe
        because they are gone (an idle engine's death shows only when it is asked)."""
        import ray
        from ray.exceptions import RayActorError

        live = set(self.pool.live) | {name for name, _ in self._admitted}
        probes = {name: actor.weight_version.remote() for name, actor in zip(self.names, self.actors) if name in live}
        ray.wait(list(probes.values()), num_returns=len(probes), timeout=deadline.seconds if deadline else None)
        for name, probe in probes.items():
            try:
                ray.get(probe, timeout=0)
            except RayActorError:
                live.discard(name)
            except ray.exceptions.GetTimeoutError:
                pass  # busy past the deadline: the push's own wait will name it
        for name in [n for n in self.names if n not in live]:
            index = self.names.index(name)
            del self.names[index], self.actors[index]
            self._admitted = [(n, a) for n, a in self._admitted if n != name]
            if name in self.pool.names:
                self.pool.retire(name)
            self._release(name)
            log.warning("rollout: %s is gone (its node left or it died); %d engines left", name, len(self.actors))

    def _start_where_placed(self) -> None:
        if self._asked is not None and self._asked.is_ready():
            placement, self._asked = self._asked, None
            name, actor = self._start_engine(placement, 0)
            self._loading.append((name, actor, actor.weight_version.remote()))  # answers once loaded
            log.info("rollout: room for one more engine: starting %s", name)

    def _admit_loaded(self) -> None:
        import ray
        from ray.exceptions import RayActorError

        for entry in list(self._loading):
            name, actor, ready = entry
            if not ray.wait([ready], timeout=0)[0]:
                continue
            self._loading.remove(entry)
            try:
                ray.get(ready)
            except RayActorError as exc:  # its node left while it loaded, or the engine failed to start
                log.warning("rollout: %s did not start (%s)", name, str(exc).splitlines()[0])
                self._release(name)
                continue
            self.names.append(name)
            self.actors.append(actor)
            self._admitted.append((name, actor))
            log.info("rollout: %s has loaded; it joins the weight group at this push", name)

    def _ask(self) -> None:
        """Keep one placement asked for while the pool is below ``max_actors``."""
        from segr1.runtime.ray_cluster import pending_placement

        if self._asked is None and len(self.actors) + len(self._loading) < self.settings.max_actors:
            self._asked = self._own(pending_placement(self._request, name=self._placement_name()))

    def _release(self, name: str) -> None:
        """Free a dead engine's placement: Ray would otherwise reschedule it on another node."""
        placement, _ = self._slots.pop(name)
        placement.remove()
        self._owned.remove(placement)

    # ------------------------------------------------------------------ rollouts

    def submit(self, items: list[PromptItem], sampling: SamplingSettings) -> Any:
        """Queue one batch of prompts; returns the pool task (``.result``: list[RolloutGroup])."""
        return self.pool.submit("generate", items, sampling, work=len(items))

    def poll(self, timeout: float | None = 0.0) -> list[Any]:
        return self.pool.poll(timeout)

    def generate(
        self, items: list[PromptItem], sampling: SamplingSettings, batch_size: int | None = None
    ) -> list[RolloutGroup]:
        """Every item's group, in input order, spread over the actors: by default one call per
        engine, as the training pipeline sends them (an engine batches only one call's prompts)."""
        if batch_size is None:
            batch_size = prompts_per_call(len(items), self.engines)
        tasks = [self.submit(items[i : i + batch_size], sampling) for i in range(0, len(items), batch_size)]
        self.pool.wait_all()
        return [group for task in tasks for group in task.result]

    def stats(self) -> dict[str, dict[str, float]]:
        return self.pool.stats()

    # ------------------------------------------------------------------ weight sync

    @property
    def world_size(self) -> int:
        """Ranks of the weight group: the learner's sender plus every engine worker."""
        return 1 + len(self.actors) * self.tensor_parallel_size

    def join_weight_group(self, host: str, port: int, secret: str) -> list[Any]:
        """Refs of every actor joining the group at ``host:port`` with the job's ``secret``; run
        with the sender's join."""
        tp = self.tensor_parallel_size
        return [
            actor.join_weight_group.remote(host, port, 1 + i * tp, self.world_size, secret)
            for i, actor in enumerate(self.actors)
        ]

    def receive_weights(self, plan: BucketPlan | dict, version: int) -> list[Any]:
        """Refs of one sync's control call on every actor; run with the sender's send."""
        plan_json = plan.to_json() if isinstance(plan, BucketPlan) else plan
        return [actor.receive_weights.remote(plan_json, version) for actor in self.actors]

    def weight_versions(self) -> dict[str, int]:
        import ray

        return dict(zip(self.names, ray.get([a.weight_version.remote() for a in self.actors])))

    def out_of_sync(self, version: int, address: tuple[str, int], deadline: Deadline | None = None) -> list[str]:
        """Actors not at ``version`` or not in the group at ``address`` (e.g. restarted ones); they
        answer after the calls queued before, all within ``deadline``."""
        asked = [(name, a.weight_group.remote()) for name, a in zip(self.names, self.actors)]
        asked += [(name, a.weight_version.remote()) for name, a in zip(self.names, self.actors)]
        answers = get_within(asked, deadline, "weight_group and weight_version")  # one wait for both
        states, versions = answers[: len(self.actors)], answers[len(self.actors) :]
        expected = (address[0], int(address[1]), self.world_size)
        return [
            name
            for name, group, v in zip(self.names, states, versions)
            if v != version or group is None or tuple(group) != expected
        ]

    def shutdown(self) -> None:
        """Kill the actors (no restart), those still loading too, and free the placements the pool made."""
        import ray

        for actor in self.actors + [actor for _, actor, _ in self._loading]:
            ray.kill(actor, no_restart=True)
        for placement in self._owned:
            placement.remove()
        self._owned = []


def actor_runtime_env(runtime_env: dict | None, use_gpu: bool) -> dict:
    """The caller's runtime env plus what a rollout actor needs: this repo importable (vLLM
    resolves the worker extension by name), on CPU the in-process engine core, and the tests'
    fault switch when it is on."""
    env = dict(runtime_env or {})
    env_vars = dict(env.get("env_vars", {}))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if "PYTHONPATH" not in env_vars:
        env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    if not use_gpu:
        env_vars.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env["env_vars"] = env_vars
    return with_fault_switch(env)
