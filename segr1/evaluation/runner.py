"""The evaluation on Ray: vLLM rollout actors write one completion per example, SAM2 reward actors
turn it into a mask.

Per example: the driver loads the image at its original size, resizes a copy to size x size (the
paper's square input), renders the task prompt and puts both images and the ground truth in the
object store once. The policy's processor resizes that square once more (sides multiples of 28
within ``model.min_pixels``/``max_pixels``: 768 -> 756), and its coordinates are in that frame
(``segr1.core.frames``), which each prompt carries as ``policy_size``. A rollout actor generates (greedy
by default: temperature 0, n = 1); the group then goes to a reward actor with its image swapped
for the original, so SAM2 runs on the full-resolution image and the actor scales the policy's
coordinates by original / policy frame. The actor returns the mask as PNG. The stream is the
training job's (``actors.pipeline.Pipeline``): each group is scored the moment it is generated, and
a bounded number of examples is in flight, so memory stays flat and every actor has work. Both
pools retry a call whose actor died.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from itertools import islice
from typing import Any

import numpy as np
import ray

from actors.pipeline import IssuedPrompt, Pipeline
from actors.reward import RewardSettings, make_reward_pool
from actors.rollout import RolloutPool, RolloutSettings
from segr1.config import EvalSettings
from segr1.core.frames import policy_image, processor_bounds
from segr1.core.parser import parse_completion
from segr1.core.policy import ModelSettings
from segr1.core.prompts import PromptRenderer
from segr1.core.schema import PromptItem, RolloutGroup
from segr1.data.records import decode_mask
from segr1.evaluation.datasets import Example, Sample
from segr1.evaluation.scoring import Prediction
from segr1.segmenters.settings import Sam2Settings


class RayPredictor:
    """A `Predictor` over rollout and reward actor pools, built from the job's sections as they are
    (``model``, ``sam2``, ``rollout``, ``reward``, ``evaluation``); call ``shutdown`` when done."""

    def __init__(
        self, model: ModelSettings, sam2: Sam2Settings, rollout: RolloutSettings, reward: RewardSettings,
        evaluation: EvalSettings,
    ) -> None:
        from learner.inputs import load_processor

        self.sampling = evaluation.sampling()
        self.limits = reward.limits
        self.processor = load_processor(model.path, model.min_pixels, model.max_pixels)
        self.bounds = processor_bounds(self.processor)  # the engines resize with the same ones
        # An evaluation does not follow the cluster: an elastic setting means its first engines.
        rollout = replace(rollout, num_actors=rollout.first_actors)
        self.rollout_pool = RolloutPool(model, rollout, seed=evaluation.seed, name_prefix="eval-rollout")
        self.reward_pool = make_reward_pool(sam2, reward, name_prefix="eval-reward")
        self.pipeline = Pipeline(self.rollout_pool.pool, self.reward_pool.pool, self.sampling,
                                 evaluation.prompts_per_call)
        # Every actor slot gets a call's worth of prompts, so no engine or SAM2 waits for work.
        slots = rollout.num_actors * rollout.max_in_flight_per_actor + reward.num_actors * reward.max_in_flight_per_actor
        self.capacity = slots * evaluation.prompts_per_call
        self._prompt = PromptRenderer(self.processor)
        self._issued = 0

    def shutdown(self) -> None:
        self.rollout_pool.shutdown()
        self.reward_pool.shutdown()

    def _issue(self, task: str, size: int, example: Example, sample: Sample) -> IssuedPrompt:
        self._issued += 1
        item = PromptItem(
            group_id=f"eval{self._issued}:{example.id}",
            record_id=example.id,
            prompt=self._prompt(task, example.expression),
            image=ray.put(np.ascontiguousarray(policy_image(sample.image, size))),
            policy_size=self.bounds.frame((size, size)),
            task=task,
        )
        original = ray.put(np.ascontiguousarray(sample.image))  # SAM2 segments the full-resolution image
        return IssuedPrompt(item, ray.put(sample.gt), score_image=original)

    def _prediction(self, group: RolloutGroup, score: Any) -> Prediction:
        completion = group.completions[0]
        if score.mask_png is None:
            raise RuntimeError(f"example {group.item.record_id!r}: the reward actor returned no mask")
        mask = decode_mask(score.mask_png)
        prompt_set = parse_completion(completion.text, group.item.policy_size, self.limits)
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
        in_flight: dict[str, tuple[Example, Sample]] = {}
        remaining = iter(examples)
        while True:
            issued = []
            for example in islice(remaining, self.capacity - len(in_flight)):
                sample = example.load()
                issued.append(self._issue(task, size, example, sample))
                in_flight[issued[-1].item.group_id] = (example, sample)
            if issued:
                self.pipeline.submit(issued, with_masks=len(issued))
            if not in_flight:
                return
            for scored in self.pipeline.pump(timeout=0.05):
                example, sample = in_flight.pop(scored.group.rollout.group_id)
                yield example, sample, self._prediction(scored.group.rollout, scored.group.scores[0])
