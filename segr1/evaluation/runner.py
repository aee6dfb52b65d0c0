"""The evaluation on Ray: vLLM rollout actors write one completion per example, SAM2 reward actors
turn it into a mask.

Per example: the driver loads the image at its original size, resizes a copy to size x size (the
paper's square input), renders the task prompt and puts both images and the ground truth in the
object store once. The policy's processor resizes that square once more (sides multiples of 28
within the checkpoint's pixel bounds: 768 -> 756), and its coordinates are in that frame
(``segr1.core.frames``), which each prompt carries as ``policy_size``. A rollout actor generates (greedy
by default: temperature 0, n = 1); the group then goes to a reward actor with its image swapped
for the original, so SAM2 runs on the full-resolution image and the actor scales the policy's
coordinates by original / policy frame. The actor returns the mask as PNG. Rollouts and scoring
overlap: each group is scored the moment it is generated, and a bounded number of examples is in
flight, so memory stays flat and every actor has work. Both pools retry a call whose actor died.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from actors.reward import RewardSettings, make_reward_pool
from actors.rollout import RolloutPool, RolloutSettings, SamplingSettings
from segr1.core.frames import processor_bounds
from segr1.core.parser import ParserLimits, parse_completion
from segr1.core.prompts import build_messages, render_prompt
from segr1.core.schema import PromptItem, RolloutGroup
from segr1.data.records import decode_mask
from segr1.evaluation.datasets import Example, Sample
from segr1.evaluation.scoring import Prediction, policy_image

GREEDY = SamplingSettings(n=1, temperature=0.0, top_p=1.0, max_tokens=400)


@dataclass(frozen=True)
class RunnerSettings:
    """The actors and how they run. ``policy`` is a Hugging Face directory; ``sam2_checkpoint``
    "tiny" builds the random tiny SAM2 on each reward actor (tests and the demo). ``min_pixels``/
    ``max_pixels`` None keep the policy's own image bounds (an export keeps its run's)."""

    policy: str
    sam2_config: str
    sam2_checkpoint: str
    sam2_size: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    rollout_actors: int = 1
    reward_actors: int = 1
    sampling: SamplingSettings = GREEDY
    dtype: str = "bfloat16"
    max_model_len: int = 4096
    kv_cache_memory_bytes: int = 1 << 30
    gpu_memory_utilization: float = 0.6
    rollout_gpus: float = 1.0
    reward_gpus: float = 1.0
    rollout_cpus: float = 1.0
    reward_cpus: float = 1.0
    bf16: bool = True
    prompts_per_call: int = 8
    max_in_flight_per_actor: int = 2
    seed: int = 0
    limits: ParserLimits = dataclasses.field(default_factory=ParserLimits)

    def __post_init__(self) -> None:
        if self.sampling.n != 1:
            raise ValueError(f"evaluation takes one completion per example, got sampling.n={self.sampling.n}")
        for name in ("rollout_actors", "reward_actors", "prompts_per_call", "max_in_flight_per_actor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def start_rollout_pool(settings: RunnerSettings) -> RolloutPool:
    """``rollout_actors`` restartable vLLM actors behind the rollout role's own pool; each takes
    ``rollout_gpus`` GPUs (its tensor-parallel size) when the cluster has GPUs."""
    engine = RolloutSettings(
        model=settings.policy,
        dtype=settings.dtype,
        tensor_parallel_size=max(1, int(settings.rollout_gpus)) if ray.cluster_resources().get("GPU", 0) else 1,
        max_model_len=settings.max_model_len,
        kv_cache_memory_bytes=settings.kv_cache_memory_bytes,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        seed=settings.seed,
        min_pixels=settings.min_pixels,
        max_pixels=settings.max_pixels,
    )
    return RolloutPool(
        engine,
        settings.rollout_actors,
        cpus_per_actor=settings.rollout_cpus,
        max_in_flight_per_actor=settings.max_in_flight_per_actor,
        name_prefix="eval-rollout",
    )


@dataclass
class _InFlight:
    example: Example
    sample: Sample
    image_ref: Any  # the original-size image, for SAM2
    mask_ref: Any


class RayPredictor:
    """A `Predictor` over rollout and reward actor pools; call ``shutdown`` when done."""

    def __init__(self, settings: RunnerSettings) -> None:
        from learner.inputs import load_processor

        self.settings = settings
        self.processor = load_processor(settings.policy, settings.min_pixels, settings.max_pixels)
        self.bounds = processor_bounds(self.processor)  # the engines resize with the same ones
        self.rollout_pool = start_rollout_pool(settings)
        self.rollout = self.rollout_pool.pool
        reward = RewardSettings(
            backend="sam2",
            sam2_config=settings.sam2_config,
            sam2_checkpoint=settings.sam2_checkpoint,
            sam2_image_size=settings.sam2_size,
            num_gpus=settings.reward_gpus,
            num_cpus=settings.reward_cpus,
            bf16=settings.bf16,
            limits=settings.limits,
        )
        self.reward = make_reward_pool(
            reward,
            settings.reward_actors,
            max_in_flight_per_actor=settings.max_in_flight_per_actor,
            name_prefix="eval-reward",
        )
        self._prompts: dict[str, str] = {}
        self._issued = 0

    def shutdown(self) -> None:
        self.rollout_pool.shutdown()
        self.reward.shutdown()

    def _prompt(self, task: str, expression: str | None) -> str:
        if expression is not None:
            return render_prompt(self.processor, build_messages(task, expression))
        if task not in self._prompts:  # COD/SOD prompts are the same for every image
            self._prompts[task] = render_prompt(self.processor, build_messages(task))
        return self._prompts[task]

    def _issue(self, task: str, size: int, example: Example) -> tuple[PromptItem, _InFlight]:
        sample = example.load()
        self._issued += 1
        item = PromptItem(
            group_id=f"eval{self._issued}:{example.id}",
            record_id=example.id,
            prompt=self._prompt(task, example.expression),
            image=ray.put(np.ascontiguousarray(policy_image(sample.image, size))),
            policy_size=self.bounds.frame((size, size)),
            task=task,
        )
        refs = _InFlight(example, sample, ray.put(np.ascontiguousarray(sample.image)), ray.put(sample.gt))
        return item, refs

    def _prediction(self, group: RolloutGroup, score: Any, sample: Sample) -> Prediction:
        completion = group.completions[0]
        if score.mask_png is None:
            raise RuntimeError(f"example {group.item.record_id!r}: the reward actor returned no mask")
        mask = decode_mask(score.mask_png)
        prompt_set = parse_completion(completion.text, group.item.policy_size, self.settings.limits)
        extra = {
            "reward": float(score.reward),
            "finish_reason": completion.finish_reason,
            "completion_tokens": len(completion.token_ids),
            "weight_version": group.weight_version,
            "rollout_actor": group.actor,
        }
        return Prediction(mask, completion.text, prompt_set, group.item.policy_size, extra)

    def __call__(
        self, task: str, size: int, examples: Iterator[Example]
    ) -> Iterator[tuple[Example, Sample, Prediction]]:
        s = self.settings
        capacity = (s.rollout_actors + s.reward_actors) * s.max_in_flight_per_actor * s.prompts_per_call
        in_flight: dict[str, _InFlight] = {}
        chunk: list[PromptItem] = []
        remaining = iter(examples)
        exhausted = False
        while True:
            while not exhausted and len(in_flight) < capacity:
                example = next(remaining, None)
                if example is None:
                    exhausted = True
                    break
                item, refs = self._issue(task, size, example)
                in_flight[item.group_id] = refs
                chunk.append(item)
                if len(chunk) == s.prompts_per_call:
                    self.rollout.submit("generate", chunk, s.sampling)
                    chunk = []
            if chunk:  # a partial chunk: the input ran out or the window is full
                self.rollout.submit("generate", chunk, s.sampling)
                chunk = []
            if not in_flight:
                return
            # Short waits on each pool in turn: neither a busy spin nor a stall of the other pool.
            for task_done in self.rollout.poll(0.01 if self.reward.pool.pending else 0.05):
                for group in task_done.result:
                    refs = in_flight[group.group_id]
                    original = dataclasses.replace(group, item=dataclasses.replace(group.item, image=refs.image_ref))
                    self.reward.submit(original, refs.mask_ref, True)
            for task_done in self.reward.poll(0.01 if self.rollout.pending else 0.05):
                group = task_done.args[0]
                refs = in_flight.pop(group.group_id)
                yield refs.example, refs.sample, self._prediction(group, task_done.result[0], refs.sample)
