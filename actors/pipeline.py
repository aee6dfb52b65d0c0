"""Prompts in, scored groups out: each group goes to a reward actor the moment it is generated.

The one rollout-to-reward stream of the project: the trainer and the evaluation runner both drive
it. The driver never waits for a whole batch of rollouts before scoring starts; with several
rollout and reward actors, generation and SAM2 decoding of different groups overlap. ``pump`` is
called in a loop (by the trainer also while the learner trains, in async mode) and returns
whatever has been scored since the last call.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from segr1.core.schema import PromptItem, RolloutGroup, ScoredGroup


@dataclass(frozen=True)
class IssuedPrompt:
    """A prompt item plus the ground-truth mask reference the reward actor scores it against.

    ``score_image``: the image SAM2 segments, when not the policy's (evaluation scores on the
    original-size image; the reward actor maps the answer from the policy's frame to it)."""

    item: PromptItem
    mask: Any
    score_image: Any = None


@dataclass
class ScoredPrompt:
    """A scored group with the mask ref it was scored against, for sample pictures."""

    group: ScoredGroup
    mask: Any


@dataclass
class Pipeline:
    rollout: Any  # ActorPool of RolloutActors (method "generate")
    reward: Any  # ActorPool of RewardActors (method "score_group")
    sampling: Any  # the default SamplingSettings for the rollout actors
    prompts_per_call: int | None = 1  # None: each submit in one call per live engine
    _issued: dict[str, IssuedPrompt] = field(default_factory=dict)
    _want_masks: set[str] = field(default_factory=set)

    def submit(self, prompts: list[IssuedPrompt], sampling: Any = None, with_masks: int = 0) -> None:
        """Start generating ``prompts``; the first ``with_masks`` groups return predicted masks too."""
        sampling = self.sampling if sampling is None else sampling
        for i, prompt in enumerate(prompts):
            self._issued[prompt.item.group_id] = prompt
            if i < with_masks:
                self._want_masks.add(prompt.item.group_id)
        size = self.prompts_per_call or prompts_per_call(len(prompts), len(self.rollout.live))
        for start in range(0, len(prompts), size):
            chunk = [p.item for p in prompts[start : start + size]]
            self.rollout.submit("generate", chunk, sampling, work=len(chunk))

    @property
    def pending(self) -> int:
        return self.rollout.pending + self.reward.pending

    def pump(self, timeout: float = 0.05) -> list[ScoredPrompt]:
        """Forward finished rollouts to scoring; return the groups scored since the last call."""
        for task in self.rollout.poll(timeout if not self.reward.pending else 0.0):
            for group in task.result:
                self._score(group)
        scored = []
        for task in self.reward.poll(timeout if not self.rollout.pending else 0.0):
            group: RolloutGroup = task.args[0]
            issued = self._issued.pop(group.group_id)
            self._want_masks.discard(group.group_id)
            scored.append(ScoredPrompt(ScoredGroup(group, task.result), issued.mask))
        return scored

    def accounting(self) -> dict[str, int]:
        """Both pools' counts since they started: actor restarts, calls past deadline, groups redone."""
        rollout, reward = self.rollout.accounting(), self.reward.accounting()
        return {key: rollout[key] + reward[key] for key in rollout}

    def collect(self, count: int) -> list[ScoredPrompt]:
        """Block until ``count`` more groups are scored (or nothing is left in flight)."""
        out: list[ScoredPrompt] = []
        while len(out) < count and self.pending:
            out.extend(self.pump(timeout=0.5))
        return out

    def _score(self, group: RolloutGroup) -> None:
        issued = self._issued[group.group_id]
        if issued.score_image is not None:
            group = dataclasses.replace(group, item=dataclasses.replace(group.item, image=issued.score_image))
        self.reward.submit("score_group", group, issued.mask, group.group_id in self._want_masks)


def prompts_per_call(prompts: int, num_actors: int) -> int:
    """One call per engine: an engine runs its calls one after the other, so only the prompts of one
    call share its batch (vLLM's scheduler takes them all, however many, in continuous batching)."""
    return max(1, math.ceil(prompts / max(1, num_actors)))
