"""The records that cross actor boundaries: a prompt, a rollout group, a scored group, a train sample.

Every sample carries its group id (so reordering for load balance never breaks GRPO groups) and the
weight version that produced it (so the driver can enforce the staleness bound). Images never travel
inside these records: they hold Ray ObjectRefs (typed ``Any`` here so this module imports no Ray),
put into the object store once per record by the driver, and read by whoever needs the pixels.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def rgb_image(value: Any, owner: str) -> np.ndarray:
    """``value`` as the uint8 (H, W, 3) RGB array every role expects, or a ValueError naming
    ``owner`` (the record or group it belongs to) and what it got instead."""
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{owner}: image must be a uint8 HxWx3 RGB array, got {type(value).__name__}")
    if value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3 or 0 in value.shape:
        raise ValueError(f"{owner}: image must be a uint8 HxWx3 RGB array, got {value.dtype} array of shape "
                         f"{value.shape}")
    return value


@dataclass(frozen=True)
class PromptItem:
    """One prompt to sample a group for: the rendered chat text and a reference to its image."""

    group_id: str
    record_id: str
    prompt: str
    image: Any  # ObjectRef (or, in-process, the array itself) of a uint8 HxWx3 RGB image
    # (width, height) of the image as the policy's processor resizes it: the frame of its answers
    # (segr1.core.frames), not the stored image's size
    policy_size: tuple[int, int]
    task: str = "cod"


@dataclass
class Completion:
    """One sampled completion with the behaviour policy's log-probs of its tokens."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"completion has {len(self.token_ids)} tokens but {len(self.logprobs)} log-probs"
            )


@dataclass
class RolloutGroup:
    """G completions of one prompt, all produced by one engine at one weight version."""

    item: PromptItem
    prompt_token_ids: list[int]
    completions: list[Completion]
    weight_version: int
    actor: str = ""

    @property
    def group_id(self) -> str:
        return self.item.group_id


@dataclass
class SampleScore:
    """The reward of one completion, with its parts kept for logging."""

    reward: float
    parts: dict[str, float]
    parse_errors: tuple[str, ...] = ()
    num_boxes: int = 0
    num_points: int = 0
    mask_png: bytes | None = None


@dataclass
class ScoredGroup:
    """A rollout group with one score per completion."""

    rollout: RolloutGroup
    scores: list[SampleScore]

    def __post_init__(self) -> None:
        if len(self.scores) != len(self.rollout.completions):
            raise ValueError(
                f"group {self.rollout.group_id}: {len(self.scores)} scores for "
                f"{len(self.rollout.completions)} completions"
            )

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.scores]


@dataclass
class TrainSample:
    """What the learner needs for one completion: the prompt, its image ref, tokens and advantage."""

    group_id: str
    prompt: str
    image: Any  # ObjectRef of the group's image; the learner processes it once per group
    completion_ids: list[int]
    behavior_logprobs: list[float]
    advantage: float
    weight_version: int
    extra: dict[str, float] = field(default_factory=dict)
    # The rollout engine's prompt (image pads expanded): its length and ``prompt_digest``. The
    # learner re-tokenises the prompt and refuses a mismatch; None (SFT samples) is not checked.
    prompt_length: int | None = None
    prompt_sha256: str | None = None


def prompt_digest(token_ids: Sequence[int]) -> str:
    """SHA-256 of prompt token ids as little-endian int32 bytes.

    One definition for both sides: the rollout's prompt ids are hashed here on the driver and the
    learner's re-tokenised ids with the same function, so equal prompts give equal digests.
    """
    return hashlib.sha256(struct.pack(f"<{len(token_ids)}i", *token_ids)).hexdigest()


def train_samples(group: ScoredGroup, advantages: list[float]) -> list[TrainSample]:
    """Flatten a scored group into one train sample per completion."""
    rollout = group.rollout
    if len(advantages) != len(rollout.completions):
        raise ValueError(
            f"group {rollout.group_id}: {len(advantages)} advantages for "
            f"{len(rollout.completions)} completions"
        )
    digest = prompt_digest(rollout.prompt_token_ids)
    return [
        TrainSample(
            group_id=rollout.group_id,
            prompt=rollout.item.prompt,
            image=rollout.item.image,
            completion_ids=list(c.token_ids),
            behavior_logprobs=list(c.logprobs),
            advantage=float(a),
            weight_version=rollout.weight_version,
            prompt_length=len(rollout.prompt_token_ids),
            prompt_sha256=digest,
        )
        for c, a in zip(rollout.completions, advantages)
    ]
