"""Turning train samples into model inputs, and model outputs into per-token log-probs.

The learner runs the Hugging Face processor itself: the rollout side sends the rendered prompt
text and a reference to the image, never pixel tensors. One GRPO group is G samples of one
prompt, so the processed prompt (token ids, pixel values, image grid) is cached per group and
shared by its G samples.

Sequences are right-padded ``prompt + completion + pad``. The model computes logits only from
the shortest prompt's last position onward (``logits_to_keep``), and each row's completion
logits are gathered from there: the vocabulary projection of long image prompts is skipped
without left padding, which would leave rows of SDPA attention with nothing to attend to.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segr1.core.frames import processor_bounds, processor_size
from segr1.core.logprobs import token_logprobs_and_entropy
from segr1.core.schema import TrainSample, prompt_digest, rgb_image
from segr1.core.vocab import vision_token_ids


@dataclass(frozen=True)
class PromptInputs:
    """One processed prompt: its tokens (image placeholders expanded) and the image's pixels."""

    input_ids: torch.Tensor  # [P] int64
    mm_token_type_ids: torch.Tensor  # [P] int64, 1 at image-pad positions (drives M-RoPE)
    pixel_values: torch.Tensor  # [patches, channels * temporal * patch * patch]
    image_grid_thw: torch.Tensor  # [1, 3]
    sha256: str  # prompt_digest(input_ids), compared with the rollout engine's


@dataclass
class ModelBatch:
    """A padded micro-batch: what the model's forward takes plus the per-token GRPO inputs."""

    model_inputs: dict[str, torch.Tensor]
    prompt_lengths: torch.Tensor  # [B]
    completion_ids: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T] float, 1 on real completion tokens
    behavior_logprobs: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B]
    sample_weights: torch.Tensor  # [B] 1 for real samples, 0 for rank-balancing fillers

    @property
    def num_tokens(self) -> int:
        """Real (prompt + completion) tokens of the real samples, for throughput."""
        lengths = self.model_inputs["attention_mask"].sum(dim=1).float()
        return int((lengths * self.sample_weights).sum().item())

    def to(self, device: torch.device) -> ModelBatch:
        return ModelBatch(
            model_inputs={k: v.to(device) for k, v in self.model_inputs.items()},
            prompt_lengths=self.prompt_lengths.to(device),
            completion_ids=self.completion_ids.to(device),
            completion_mask=self.completion_mask.to(device),
            behavior_logprobs=self.behavior_logprobs.to(device),
            advantages=self.advantages.to(device),
            sample_weights=self.sample_weights.to(device),
        )


def load_processor(model_path: str, min_pixels: int | None = None, max_pixels: int | None = None) -> Any:
    """The policy's Hugging Face processor with the image-size bounds the rollout engines use.

    vLLM gets the same bounds as ``mm_processor_kwargs``; with different ones an image would be
    resized to another grid, expand into another number of ``<|image_pad|>`` tokens, and the
    learner would score tokens the engine never saw. None keeps the checkpoint's own bound.
    """
    from transformers import AutoImageProcessor, AutoProcessor

    size = processor_size(min_pixels, max_pixels,
                          checkpoint=lambda: processor_bounds(AutoImageProcessor.from_pretrained(model_path)))
    processor = AutoProcessor.from_pretrained(model_path)
    if size:
        # A checkpoint may name its bounds as flat min_pixels/max_pixels too (Qwen2.5-VL-3B-Instruct's
        # does), and those win over a `size` given alone. Given both to the image processor's
        # constructor, ours replace them, and no call carries the flat aliases (transformers warns at
        # each that does). Swapped in after loading: as a from_pretrained kwarg the image processor
        # (or the bounds) would land in the tokenizer's saved config too.
        processor.image_processor = AutoImageProcessor.from_pretrained(
            model_path, size=size, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    return processor


def resolve_image(image: Any, group_id: str) -> np.ndarray:
    """The uint8 HxWx3 array behind a sample's image (a Ray ObjectRef or the array itself)."""
    if not isinstance(image, np.ndarray):
        import ray  # only when a reference actually arrives: in-process callers need no Ray

        image = ray.get(image)
    return rgb_image(image, f"group {group_id}")


def process_prompt(processor: Any, prompt: str, image: np.ndarray, group_id: str) -> PromptInputs:
    """Run the HF processor on one prompt and image, as vLLM does on the rollout side.

    The image goes in as PIL, as the rollout engines receive it, so both sides resize it the same way.
    """
    from PIL import Image

    if prompt.count(processor.image_token) != 1:
        raise ValueError(
            f"group {group_id}: prompt must hold exactly one {processor.image_token} placeholder, "
            f"found {prompt.count(processor.image_token)}"
        )
    out = processor(text=[prompt], images=[Image.fromarray(image)], return_tensors="pt")
    return PromptInputs(
        input_ids=out["input_ids"][0].long(),
        mm_token_type_ids=out["mm_token_type_ids"][0].long(),
        pixel_values=out["pixel_values"],
        image_grid_thw=out["image_grid_thw"].long(),
        sha256=prompt_digest(out["input_ids"][0].tolist()),
    )


def check_engine_prompt(sample: TrainSample, prompt: PromptInputs) -> None:
    """Refuse a sample whose rollout engine saw another prompt than the learner just built.

    The log-probs are only comparable when both sides hold the same tokens; the usual cause of a
    difference is an image resized to another grid (other min/max_pixels), so the prompt expands
    into another number of image pads. Samples without engine tokens (SFT) are not checked.
    """
    length, digest = len(prompt.input_ids), prompt.sha256
    if (sample.prompt_length is not None and sample.prompt_length != length) or (
        sample.prompt_sha256 is not None and sample.prompt_sha256 != digest
    ):
        raise ValueError(
            f"group {sample.group_id}: the rollout engine's prompt has {sample.prompt_length} tokens "
            f"(sha256 {str(sample.prompt_sha256)[:12]}) but the learner's has {length} ({digest[:12]}); "
            "the learner must use the engines' processor and image bounds (model.min_pixels/max_pixels)"
        )


class PromptCache:
    """Processed prompts by group id, least recently used first out.

    A group's G samples share one prompt and image, so a train step processes each image once.
    The cache outlives a step so that a log-prob check followed by a train step on the same
    groups does not process them twice; ``capacity`` bounds the pixel tensors it holds.
    """

    def __init__(self, processor: Any, capacity: int = 64) -> None:
        if capacity < 1:
            raise ValueError(f"prompt cache capacity must be at least 1, got {capacity}")
        self.processor = processor
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str], PromptInputs] = OrderedDict()
        self.misses = 0

    def get(self, sample: TrainSample) -> PromptInputs:
        key = (sample.group_id, sample.prompt)
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            image = resolve_image(sample.image, sample.group_id)
            entry = process_prompt(self.processor, sample.prompt, image, sample.group_id)
            self._entries[key] = entry
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        check_engine_prompt(sample, entry)
        return entry


def validate_sample(sample: TrainSample) -> None:
    """Reject a sample whose log-probs do not line up with its tokens, naming the group."""
    if len(sample.completion_ids) != len(sample.behavior_logprobs):
        raise ValueError(
            f"group {sample.group_id}: {len(sample.completion_ids)} completion tokens but "
            f"{len(sample.behavior_logprobs)} behavior log-probs"
        )
    if not np.isfinite(sample.advantage):
        raise ValueError(f"group {sample.group_id}: advantage {sample.advantage} is not finite")


def collate(
    samples: Sequence[TrainSample],
    prompts: Sequence[PromptInputs],
    pad_token_id: int,
    weights: Sequence[float] | None = None,
) -> ModelBatch:
    """Pad samples (with their processed prompts) into one micro-batch."""
    if not samples:
        raise ValueError("cannot collate an empty micro-batch")
    for sample in samples:
        validate_sample(sample)
    batch = len(samples)
    lengths = [len(p.input_ids) + len(s.completion_ids) for s, p in zip(samples, prompts)]
    width = max(lengths)
    max_completion = max(1, max(len(s.completion_ids) for s in samples))

    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    mm_token_type_ids = torch.zeros((batch, width), dtype=torch.long)
    completion_ids = torch.full((batch, max_completion), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((batch, max_completion))
    behavior = torch.zeros((batch, max_completion))
    for row, (sample, prompt) in enumerate(zip(samples, prompts)):
        n_prompt, n_completion = len(prompt.input_ids), len(sample.completion_ids)
        ids = torch.tensor(sample.completion_ids, dtype=torch.long)
        input_ids[row, :n_prompt] = prompt.input_ids
        input_ids[row, n_prompt : n_prompt + n_completion] = ids
        attention_mask[row, : n_prompt + n_completion] = 1
        mm_token_type_ids[row, :n_prompt] = prompt.mm_token_type_ids
        completion_ids[row, :n_completion] = ids
        completion_mask[row, :n_completion] = 1.0
        behavior[row, :n_completion] = torch.tensor(sample.behavior_logprobs, dtype=torch.float32)

    return ModelBatch(
        model_inputs={
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": mm_token_type_ids,
            "pixel_values": torch.cat([p.pixel_values for p in prompts], dim=0),
            "image_grid_thw": torch.cat([p.image_grid_thw for p in prompts], dim=0),
        },
        prompt_lengths=torch.tensor([len(p.input_ids) for p in prompts], dtype=torch.long),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        behavior_logprobs=behavior,
        advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32),
        sample_weights=torch.tensor(list(weights) if weights is not None else [1.0] * batch),
    )


def completion_logits(model: Any, batch: ModelBatch) -> torch.Tensor:
    """Logits [B, T, V] that predict each completion token (row b, token t at P_b + t)."""
    prompt_lengths = batch.prompt_lengths
    width = batch.model_inputs["input_ids"].shape[1]
    first = int(prompt_lengths.min().item()) - 1  # the earliest position whose logits predict a completion token
    keep = width - first
    out = model(**batch.model_inputs, logits_to_keep=keep, use_cache=False)
    logits = out.logits  # [B, keep, V]: positions first .. width-1
    steps = torch.arange(batch.completion_ids.shape[1], device=logits.device)
    index = (prompt_lengths.to(logits.device)[:, None] - 1 - first + steps[None, :]).clamp(max=keep - 1)
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    return logits[rows, index]


@dataclass(frozen=True)
class Sampled:
    """The distribution the engines sample from, whose log-probs the learner trains on: the logits
    divided by the rollout's ``temperature``, without the ids the engines ban (the vision markup,
    and every id from ``text_vocab`` on, which has no text). The engines return these log-probs
    (``actors.vision_ban``), so the importance ratio and the KL describe what was sampled."""

    temperature: float = 1.0
    vision_ids: tuple[int, ...] = ()
    text_vocab: int | None = None

    @classmethod
    def of(cls, processor: Any, hf_config: Any, temperature: float = 1.0) -> Sampled:
        tokenizer = processor.tokenizer
        return cls(temperature, tuple(sorted(vision_token_ids(tokenizer, hf_config))), len(tokenizer))

    def banned(self, vocab: int, device: torch.device) -> torch.Tensor | None:
        tail = range(self.text_vocab, vocab) if self.text_vocab is not None else range(0)
        ids = [*self.vision_ids, *tail]
        return torch.tensor(ids, dtype=torch.long, device=device) if ids else None

    def logprobs_and_entropy(self, logits: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(token) and the entropy, [B, T], in float32 whatever the model's dtype (vLLM's are
        float32 too), without a whole-vocabulary copy (``segr1.core.logprobs``)."""
        banned = self.banned(logits.shape[-1], logits.device)
        return token_logprobs_and_entropy(logits, token_ids, self.temperature, banned)

    def logprobs(self, logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        return self.logprobs_and_entropy(logits, token_ids)[0]


# ----------------------------------------------------------------------------------------------
# Splitting a batch over ranks and micro-batches


@dataclass
class MicroBatch:
    """Samples one rank runs through the model together.

    ``indices`` are the samples' positions in the caller's list (to put results back in order).
    ``share`` is this micro-batch's part of the batch objective: the fraction of the batch's
    completion tokens (``token_mean``) or of its non-empty completions (``seq_mean``) that it holds.
    Summing ``share x loss`` over every micro-batch of every rank gives the loss of the whole batch
    in one piece, whatever the split. A filler (``share`` 0) only keeps the ranks in step.
    """

    samples: list[TrainSample]
    indices: list[int]
    share: float

    @property
    def is_filler(self) -> bool:
        return self.share == 0.0 and not self.indices


def plan_micro_batches(
    samples: Sequence[TrainSample], num_ranks: int, micro_batch_size: int, aggregation: str = "token_mean"
) -> list[list[MicroBatch]]:
    """Split ``samples`` over ``num_ranks`` ranks into micro-batches of at most ``micro_batch_size``.

    Samples go longest first to the rank with the fewest completion tokens so far (the prompts of
    a batch differ little; completions dominate the difference). Each rank's samples are then cut
    into micro-batches in length order, so padding stays small. Every rank gets the same number of
    micro-batches, padding with fillers: under ZeRO-3 each forward and backward is a collective,
    so a rank that ran out of work must still take part. The split is a pure function of the
    samples, so a resumed run splits the next batch exactly as an uninterrupted one.
    """
    if not samples:
        raise ValueError("no samples to plan: the batch is empty")
    if num_ranks < 1 or micro_batch_size < 1:
        raise ValueError(f"num_ranks ({num_ranks}) and micro_batch_size ({micro_batch_size}) must be >= 1")
    if aggregation not in ("token_mean", "seq_mean"):
        raise ValueError(f"unknown aggregation {aggregation!r}; expected token_mean or seq_mean")
    for sample in samples:
        validate_sample(sample)

    def units(index: int) -> int:
        n = len(samples[index].completion_ids)
        return n if aggregation == "token_mean" else int(n > 0)

    total_units = sum(units(i) for i in range(len(samples)))
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].completion_ids), i))
    per_rank: list[list[int]] = [[] for _ in range(num_ranks)]
    load = [0] * num_ranks
    for index in order:
        rank = min(range(num_ranks), key=lambda r: (load[r], len(per_rank[r]), r))
        per_rank[rank].append(index)
        load[rank] += len(samples[index].completion_ids) + 1

    plans: list[list[MicroBatch]] = []
    for indices in per_rank:
        chunks = [indices[i : i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]
        plans.append([
            MicroBatch(
                samples=[samples[i] for i in chunk],
                indices=chunk,
                share=sum(units(i) for i in chunk) / total_units if total_units else 0.0,
            )
            for chunk in chunks
        ])
    steps = max(len(plan) for plan in plans)
    filler = samples[order[-1]]  # the shortest sample: the cheapest forward
    for plan in plans:
        plan.extend(MicroBatch(samples=[filler], indices=[], share=0.0) for _ in range(steps - len(plan)))
    return plans
