"""Reward actors: SAM2 resident on its own device, one image encode per GRPO group.

``RewardActor`` builds its segmenter once and scores whole groups: it reads the group's image and
ground-truth mask (ObjectRefs, read once per group), parses every completion, encodes the image once,
decodes every candidate's prompts on that embedding (``segment.masks_for_group``: one decode call
per group, batched by the SAM2 backend) and scores each candidate (``rewards.score``).

The class is plain Python so the driver, tests and the benchmark can run it in-process;
``make_reward_pool`` wraps it as a restartable Ray actor and puts M of them behind an ``ActorPool``
that hands each group to the least-loaded live actor and retries a group whose actor died.

Errors: completion text never raises (the parser turns anything into a prompt set, reward 0 when
there is no prompt). A missing, undecodable or mis-sized image or mask raises ``ValueError`` naming
the record, and scoring errors propagate: a broken reward must stop the job, not skew it silently.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.pool import ActorPool, PoolTask
from segr1.core import rewards
from segr1.core.metrics import as_gt
from segr1.core.parser import AnswerFormat, ParserLimits, parse_completion
from segr1.core.prompts import answer_format
from segr1.core.schema import RolloutGroup, SampleScore, rgb_image
from segr1.core.segment import BoxSegmenter, Segmenter, masks_for_group
from segr1.data.records import decode_image, decode_mask, encode_mask
from segr1.runtime.deadlines import hang_if_switched, with_fault_switch
from segr1.segmenters.settings import TINY_CHECKPOINT, Sam2Settings


@dataclass(frozen=True)
class RewardSettings:
    """The reward role (the job's ``reward`` section); the segmenter itself is ``Sam2Settings``.

    ``num_gpus_per_actor`` is what each actor asks Ray for when the cluster has GPUs and the backend
    is SAM2 (1.0 keeps SAM2 alone on a GPU, a fraction packs several actors on one, 0 runs SAM2 on
    the actor's CPUs). ``decode_chunk`` is the most prompts in one SAM2 decode call (0: the
    device's default). ``decode_pad_to`` > 0 pads every SAM2 prompt to that many tokens so a group
    decodes in one batch (0: exact ``predict`` masks, batches of equal-length prompts; see
    ``segr1.segmenters.sam2_segmenter``). ``bf16`` turns on bfloat16 autocast (CUDA with bf16
    support, or CPU).
    """

    num_actors: int = 1
    num_gpus_per_actor: float = 1.0
    num_cpus_per_actor: float = 1.0
    bf16: bool = True
    decode_chunk: int = 0
    decode_pad_to: int = 0
    weights: rewards.RewardWeights = field(default_factory=rewards.RewardWeights)
    limits: ParserLimits = field(default_factory=ParserLimits)
    max_restarts: int = 3
    max_in_flight_per_actor: int = 4
    call_deadline_s: float = 300.0  # a scoring call's deadline (it holds one group): this plus the next
    call_deadline_per_group_s: float = 30.0

    def __post_init__(self) -> None:
        checks = [
            (self.num_actors >= 1, f"num_actors must be >= 1, got {self.num_actors}"),
            (0 <= self.num_gpus_per_actor <= 8, f"num_gpus_per_actor must be in [0, 8], got {self.num_gpus_per_actor}"),
            (self.num_cpus_per_actor > 0, f"num_cpus_per_actor must be > 0, got {self.num_cpus_per_actor}"),
            (self.decode_chunk >= 0, f"decode_chunk must be >= 0, got {self.decode_chunk}"),
            (self.decode_pad_to >= 0, f"decode_pad_to must be >= 0, got {self.decode_pad_to}"),
            (self.max_in_flight_per_actor >= 1, f"max_in_flight_per_actor must be >= 1, got {self.max_in_flight_per_actor}"),
            (self.call_deadline_s > 0, f"call_deadline_s must be > 0, got {self.call_deadline_s}"),
            (self.call_deadline_per_group_s >= 0,
             f"call_deadline_per_group_s must be >= 0, got {self.call_deadline_per_group_s}"),
        ]
        failed = [message for ok, message in checks if not ok]
        if failed:
            raise ValueError("RewardSettings: " + "; ".join(failed))


def segmenter_device(sam2: Sam2Settings) -> str:
    """Where SAM2 runs: the process's GPU when it has one (inside Ray, only an assigned GPU is
    visible), else the CPU; the box backend always on the CPU."""
    import torch

    return "cuda" if sam2.backend == "sam2" and torch.cuda.is_available() else "cpu"


def make_segmenter(sam2: Sam2Settings, settings: RewardSettings, device: str) -> Segmenter:
    """The backend ``sam2`` names, built once, on ``device``; checkpoint ``tiny`` is built (or taken
    from the cache) by ``segr1.testing.tiny`` on the actor's own node."""
    if sam2.backend == "box":
        return BoxSegmenter(point_radius=sam2.box_point_radius)
    from segr1.segmenters.sam2_segmenter import load_sam2_segmenter

    config, checkpoint, image_size = sam2.config, sam2.checkpoint, sam2.image_size
    if checkpoint == TINY_CHECKPOINT:
        from segr1.testing.tiny import build_sam2

        tiny = build_sam2(image_size=image_size) if image_size else build_sam2()
        config, checkpoint, image_size = tiny.config, str(tiny.checkpoint), tiny.image_size
    return load_sam2_segmenter(
        config,
        checkpoint,
        image_size=image_size,
        device=device,
        autocast_bf16=settings.bf16,
        chunk_size=settings.decode_chunk,
        pad_to=settings.decode_pad_to,
    )


@dataclass
class RewardStats:
    """Work done by one actor: counts, and wall seconds per phase of ``score_group``."""

    groups: int = 0
    samples: int = 0
    encodes: int = 0
    read_s: float = 0.0
    parse_s: float = 0.0
    encode_s: float = 0.0
    decode_s: float = 0.0
    score_s: float = 0.0

    @property
    def busy_s(self) -> float:
        return self.read_s + self.parse_s + self.encode_s + self.decode_s + self.score_s

    def as_dict(self) -> dict[str, float]:
        busy = self.busy_s
        return {
            **asdict(self),
            "busy_s": busy,
            "groups_per_s": self.groups / busy if busy > 0 else 0.0,
            "samples_per_s": self.samples / busy if busy > 0 else 0.0,
        }


def _fetch(ref: Any) -> Any:
    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def read_image(value: Any, record_id: str) -> np.ndarray:
    """A uint8 (H, W, 3) RGB array from an array or encoded image bytes, or an error naming the record."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = decode_image(bytes(value))
        except Exception as err:  # PIL raises several unrelated types for bad bytes
            raise ValueError(f"record {record_id!r}: cannot decode image: {err}") from err
    return rgb_image(value, f"record {record_id!r}")


def read_mask(value: Any, record_id: str) -> np.ndarray:
    """A bool (H, W) ground truth from a bool/0-1 array or PNG bytes, or an error naming the record."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = decode_mask(bytes(value))
        except Exception as err:
            raise ValueError(f"record {record_id!r}: cannot decode mask: {err}") from err
    if not isinstance(value, np.ndarray):
        raise ValueError(f"record {record_id!r}: mask is {type(value).__name__}, not an array or bytes")
    try:
        return as_gt(value)
    except ValueError as err:
        raise ValueError(f"record {record_id!r}: {err}") from err


class RewardActor:
    """Scores GRPO groups with a resident segmenter; ``make_reward_pool`` runs it as a Ray actor."""

    def __init__(
        self, sam2: Sam2Settings, settings: RewardSettings, name: str = "reward", device: str | None = None
    ) -> None:
        self.sam2 = sam2
        self.settings = settings
        self.name = name
        self.device = device or segmenter_device(sam2)
        self.segmenter = make_segmenter(sam2, settings, self.device)
        self.stats = RewardStats()

    def info(self) -> dict[str, Any]:
        """Who this actor is; a new pid after a restart."""
        return {"name": self.name, "pid": os.getpid(), "device": self.device, "backend": self.sam2.backend}

    def get_stats(self) -> dict[str, float]:
        return self.stats.as_dict()

    def score_group(
        self, group: RolloutGroup, mask_ref: Any, return_masks: bool = False
    ) -> list[SampleScore]:
        """One ``SampleScore`` per completion of ``group``, in order, against the mask ``mask_ref``."""
        hang_if_switched(self.name, "score_group")
        item = group.item
        t0 = time.perf_counter()
        image = read_image(_fetch(item.image), item.record_id)
        gt = read_mask(_fetch(mask_ref), item.record_id)
        if gt.shape != image.shape[:2]:
            raise ValueError(
                f"record {item.record_id!r}: mask is {gt.shape[1]}x{gt.shape[0]} but image is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        fmt = _format_of(item.task, item.record_id)
        t1 = time.perf_counter()
        prompt_sets = [parse_completion(c.text, item.policy_size, self.settings.limits) for c in group.completions]
        t2 = time.perf_counter()
        # A group with no usable prompt (common early in training) needs no encode at all.
        need_image = any(not ps.is_empty for ps in prompt_sets)
        embedding = self.segmenter.embed(image) if need_image else None
        t3 = time.perf_counter()
        image_size = (image.shape[1], image.shape[0])
        masks = masks_for_group(self.segmenter, embedding, prompt_sets, item.policy_size, image_size)
        t4 = time.perf_counter()
        parts = rewards.score_group(prompt_sets, masks, gt, self.settings.weights, fmt)
        scores = [
            SampleScore(
                reward=p.total,
                parts=p.as_dict(),
                parse_errors=ps.errors,
                num_boxes=len(ps.boxes),
                num_points=len(ps.points),
                mask_png=encode_mask(mask) if return_masks else None,
            )
            for ps, p, mask in zip(prompt_sets, parts, masks)
        ]
        t5 = time.perf_counter()
        self._account(len(scores), need_image, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4))
        return scores

    def _account(self, samples: int, encoded: bool, phases: tuple[float, ...]) -> None:
        s = self.stats
        s.groups += 1
        s.samples += samples
        s.encodes += int(encoded)
        s.read_s += phases[0]
        s.parse_s += phases[1]
        s.encode_s += phases[2]
        s.decode_s += phases[3]
        s.score_s += phases[4]


def _format_of(task: str, record_id: str) -> AnswerFormat:
    try:
        return answer_format(task)
    except ValueError as err:
        raise ValueError(f"record {record_id!r}: {err}") from err


class RewardPool:
    """M reward actors behind an ``ActorPool``: least outstanding work first, bounded in-flight
    groups per actor, a group whose actor died is rescored on another one."""

    def __init__(self, pool: ActorPool) -> None:
        self.pool = pool

    @property
    def actors(self) -> list[Any]:
        return self.pool.actors

    @property
    def names(self) -> list[str]:
        return self.pool.names

    def submit(self, group: RolloutGroup, mask_ref: Any, return_masks: bool | None = None) -> PoolTask:
        return self.pool.submit("score_group", group, mask_ref, return_masks)

    def poll(self, timeout: float | None = 0.0) -> list[PoolTask]:
        return self.pool.poll(timeout)

    def score(
        self, groups: Sequence[RolloutGroup], mask_refs: Sequence[Any], return_masks: bool | None = None
    ) -> list[list[SampleScore]]:
        """Score every group; results in input order."""
        if len(groups) != len(mask_refs):
            raise ValueError(f"{len(groups)} groups but {len(mask_refs)} masks")
        tasks = [self.submit(g, m, return_masks) for g, m in zip(groups, mask_refs)]
        self.pool.wait_all()
        return [t.result for t in tasks]

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per actor: the pool's view (completed, failures, in flight, groups per wall second between
        dispatch and result) and the actor's own (groups and samples per busy second, time per phase).
        An actor that is down reports the pool's view only, with ``alive: False``."""
        merged: dict[str, dict[str, Any]] = {}
        refs = [actor.get_stats.remote() for actor in self.actors]
        for name, ref, pool_view in zip(self.names, refs, self.pool.stats().values()):
            try:
                own = ray.get(ref)
                merged[name] = {"alive": True, **pool_view, **{f"actor_{k}": v for k, v in own.items()}}
            except RayActorError:
                merged[name] = {"alive": False, **pool_view}
        return merged

    def shutdown(self) -> None:
        """Kill the actors for good (no restart)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def actor_options(
    sam2: Sam2Settings, settings: RewardSettings, name: str, cluster_gpus: float, placement_group: Any = None,
    bundle_index: int = 0,
) -> dict[str, Any]:
    """Ray options for one reward actor: GPUs only for SAM2 on a cluster that has them."""
    use_gpu = sam2.backend == "sam2" and settings.num_gpus_per_actor > 0 and cluster_gpus > 0
    options: dict[str, Any] = {
        "name": name,
        "num_cpus": settings.num_cpus_per_actor,
        "num_gpus": settings.num_gpus_per_actor if use_gpu else 0,
        "max_restarts": settings.max_restarts,
        "max_task_retries": 0,  # the pool retries, on another actor while this one restarts
    }
    if (runtime_env := with_fault_switch(None)) is not None:
        options["runtime_env"] = runtime_env
    if placement_group is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group, bundle_index)
    return options


def make_reward_pool(
    sam2: Sam2Settings,
    settings: RewardSettings,
    max_attempts: int = 10,
    name_prefix: str = "reward",
    placement_group: Any = None,
) -> RewardPool:
    """Start ``settings.num_actors`` named actors ``{name_prefix}-0..M-1`` behind a pool.

    Each actor asks for ``settings.num_gpus_per_actor`` GPUs when the cluster has any and the
    backend is SAM2, else CPUs only. With ``placement_group`` actor i goes to bundle i.
    """
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    remote_cls = ray.remote(RewardActor)
    names = [f"{name_prefix}-{i}" for i in range(settings.num_actors)]
    actors = [
        remote_cls.options(**actor_options(sam2, settings, name, cluster_gpus, placement_group, i)).remote(
            sam2, settings, name
        )
        for i, name in enumerate(names)
    ]
    pool = ActorPool(actors, names, settings.max_in_flight_per_actor, max_attempts=max_attempts,
                     deadline_s=settings.call_deadline_s, deadline_per_group_s=settings.call_deadline_per_group_s)
    return RewardPool(pool)
