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
from typing import Any, Literal

import numpy as np
import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.pool import ActorPool, PoolTask
from segr1.core import rewards
from segr1.core.metrics import as_gt
from segr1.core.parser import AnswerFormat, ParserLimits, parse_completion
from segr1.core.prompts import answer_format
from segr1.core.schema import RolloutGroup, SampleScore
from segr1.core.segment import BoxSegmenter, Segmenter, masks_for_group
from segr1.data.records import decode_image, decode_mask, encode_mask

TINY_CHECKPOINT = "tiny"  # build the seeded random hiera-tiny of segr1.testing.tiny on the actor's own node


@dataclass(frozen=True)
class RewardSettings:
    """Everything a reward actor needs; the job config nests these fields under ``reward``/``sam2``.

    ``num_gpus`` is what each actor asks Ray for when the cluster has GPUs (1.0 keeps SAM2 alone on a
    GPU; a fraction packs several actors on one). ``decode_chunk`` 0 means the device's default.
    ``decode_pad_to`` > 0 pads every SAM2 prompt to that many tokens so a group decodes in one batch
    (0: exact ``predict`` masks, batches of equal-length prompts; see ``segr1.segmenters.sam2_segmenter``).
    ``bf16`` turns on bfloat16 autocast (CUDA with bf16 support, or CPU).
    """

    backend: Literal["sam2", "box"] = "sam2"
    sam2_config: str = "configs/sam2.1/sam2.1_hiera_l.yaml"
    sam2_checkpoint: str = "checkpoints/sam2.1_hiera_large.pt"
    sam2_image_size: int | None = None
    box_point_radius: float = 4.0
    num_gpus: float = 1.0
    num_cpus: float = 1.0
    bf16: bool = True
    decode_chunk: int = 0
    decode_pad_to: int = 0
    weights: rewards.RewardWeights = field(default_factory=rewards.RewardWeights)
    limits: ParserLimits = field(default_factory=ParserLimits)
    return_masks: bool = False

    def __post_init__(self) -> None:
        if self.backend not in ("sam2", "box"):
            raise ValueError(f"RewardSettings.backend must be 'sam2' or 'box', got {self.backend!r}")
        if not 0 <= self.num_gpus <= 8:
            raise ValueError(f"RewardSettings.num_gpus must be in [0, 8], got {self.num_gpus}")
        if not self.num_cpus > 0:
            raise ValueError(f"RewardSettings.num_cpus must be > 0, got {self.num_cpus}")
        if self.decode_chunk < 0:
            raise ValueError(f"RewardSettings.decode_chunk must be >= 0, got {self.decode_chunk}")
        if self.decode_pad_to < 0:
            raise ValueError(f"RewardSettings.decode_pad_to must be >= 0, got {self.decode_pad_to}")


def make_segmenter(settings: RewardSettings, device: str) -> Segmenter:
    """The backend named by ``settings``, built once, on ``device``."""
    if settings.backend == "box":
        return BoxSegmenter(point_radius=settings.box_point_radius)
    from segr1.segmenters.sam2_segmenter import load_sam2_segmenter

    checkpoint = settings.sam2_checkpoint
    image_size = settings.sam2_image_size
    if checkpoint == TINY_CHECKPOINT:
        from segr1.testing.tiny import build_sam2

        tiny = build_sam2(image_size=image_size) if image_size else build_sam2()
        checkpoint, image_size = str(tiny.checkpoint), tiny.image_size
    return load_sam2_segmenter(
        settings.sam2_config,
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
    if not isinstance(value, np.ndarray):
        raise ValueError(f"record {record_id!r}: image is {type(value).__name__}, not an array or bytes")
    if value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3 or 0 in value.shape:
        raise ValueError(f"record {record_id!r}: image must be uint8 HxWx3 RGB, got {value.dtype} {value.shape}")
    return value


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

    def __init__(self, settings: RewardSettings, name: str = "reward", device: str | None = None) -> None:
        import torch

        self.settings = settings
        self.name = name
        # Inside Ray, only GPUs the actor asked for are visible, so "auto" means an assigned GPU.
        auto = "cuda" if settings.backend == "sam2" and torch.cuda.is_available() else "cpu"
        self.device = device or auto
        self.segmenter = make_segmenter(settings, self.device)
        self.stats = RewardStats()

    def info(self) -> dict[str, Any]:
        """Who this actor is; a new pid after a restart."""
        return {"name": self.name, "pid": os.getpid(), "device": self.device, "backend": self.settings.backend}

    def get_stats(self) -> dict[str, float]:
        return self.stats.as_dict()

    def score_group(
        self, group: RolloutGroup, mask_ref: Any, return_masks: bool | None = None
    ) -> list[SampleScore]:
        """One ``SampleScore`` per completion of ``group``, in order, against the mask ``mask_ref``."""
        item = group.item
        return_masks = self.settings.return_masks if return_masks is None else return_masks
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
    settings: RewardSettings, name: str, max_restarts: int, cluster_gpus: float, placement_group: Any = None,
    bundle_index: int = 0,
) -> dict[str, Any]:
    """Ray options for one reward actor: GPUs only for SAM2 on a cluster that has them."""
    use_gpu = settings.backend == "sam2" and settings.num_gpus > 0 and cluster_gpus > 0
    options: dict[str, Any] = {
        "name": name,
        "num_cpus": settings.num_cpus,
        "num_gpus": settings.num_gpus if use_gpu else 0,
        "max_restarts": max_restarts,
        "max_task_retries": 0,  # the pool retries, on another actor while this one restarts
    }
    if placement_group is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group, bundle_index)
    return options


def make_reward_pool(
    settings: RewardSettings,
    num_actors: int,
    max_restarts: int = 3,
    max_in_flight_per_actor: int = 2,
    max_attempts: int = 10,
    name_prefix: str = "reward",
    placement_group: Any = None,
) -> RewardPool:
    """Start ``num_actors`` named actors ``{name_prefix}-0..M-1`` and put them behind a pool.

    Each actor asks for ``settings.num_gpus`` GPUs when the cluster has any and the backend is SAM2,
    else ``settings.num_cpus`` CPUs only. With ``placement_group`` actor i goes to bundle i.
    """
    if num_actors < 1:
        raise ValueError(f"num_actors must be >= 1, got {num_actors}")
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    remote_cls = ray.remote(RewardActor)
    names = [f"{name_prefix}-{i}" for i in range(num_actors)]
    actors = [
        remote_cls.options(**actor_options(settings, name, max_restarts, cluster_gpus, placement_group, i)).remote(
            settings, name
        )
        for i, name in enumerate(names)
    ]
    pool = ActorPool(actors, names, max_in_flight_per_actor=max_in_flight_per_actor, max_attempts=max_attempts)
    return RewardPool(pool)
