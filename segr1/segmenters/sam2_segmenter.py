"""SAM2 behind the ``Segmenter`` interface: encode an image once, decode many prompts on it in batches.

``SAM2ImagePredictor`` keeps one image's features as hidden state and decodes one prompt set per
``predict`` call. A GRPO group wants the opposite shape: one encode, then every candidate's boxes
and points decoded on that embedding. ``Sam2Segmenter.embed`` therefore returns the features as a
value (``Sam2Embedding``) and clears the predictor, so no decode can silently use another group's
image, and ``decode`` runs SAM2's prompt encoder and mask decoder on whole batches of prompts.

Batching is only worth having if it gives the masks one-by-one decoding gives. In SAM2, padding
points (label -1) are real tokens of the two-way transformer, so padding prompts to the longest in a
batch would make a prompt's mask depend on its batch-mates (docs/reward.md). ``decode`` has two
consistent ways out, chosen by ``pad_to``:

* ``pad_to=0`` (exact): batch only prompts with the same number of tokens (box corners plus points),
  so a batch holds exactly the tokens ``predict`` would see for each prompt alone, and the masks
  agree with ``SAM2ImagePredictor.predict(..., multimask_output=False)``. Mixed lengths make small
  batches.
* ``pad_to=N``: every prompt is padded with not-a-point tokens to ``max(N, its length)``, alone or in
  a batch, so a group's usual prompts form one batch and each mask is the same as decoding that
  prompt alone with the same padding; it is not ``predict``'s mask, which has one padding token.

Batches are cut into chunks of ``chunk_size`` prompts: large on a GPU, where batching is the win,
small on a CPU, where a large decode batch is memory-bound.

Everything here mirrors ``SAM2ImagePredictor._prep_prompts`` and ``_predict`` of sam2 1.1.0
(coordinates scaled to the model's input frame in float32 in the same order, box corners first
with labels 2 and 3, one padding point appended by the prompt encoder, the mask threshold at 0
logits); tests/test_reward.py checks the agreement against the package's own ``predict``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from segr1.core.schema import rgb_image
from segr1.core.segment import MaskPrompt

_BOX_LABELS = (2, 3)  # SAM's labels for a box's top-left and bottom-right corners
DEFAULT_CPU_CHUNK = 8
DEFAULT_GPU_CHUNK = 64


@dataclass(frozen=True, eq=False)
class Sam2Embedding:
    """One encoded image: SAM2's lowest-resolution embedding, its two high-resolution feature maps,
    and the original image size that masks are upsampled back to."""

    image_embed: torch.Tensor  # (1, C, h, w)
    high_res_feats: tuple[torch.Tensor, ...]  # ((1, C0, 4h, 4w), (1, C1, 2h, 2w))
    height: int
    width: int


@dataclass
class SegmenterTimings:
    """Wall time spent in the image encoder and the prompt decoder since the last reset."""

    encode_s: float = 0.0
    decode_s: float = 0.0
    images: int = 0
    prompts: int = 0
    decoded: int = 0  # prompts actually run through the decoder (duplicates are decoded once)
    batches: int = 0

    def as_dict(self) -> dict[str, float]:
        return dict(vars(self))


@dataclass
class Sam2Segmenter:
    """Embeds with ``predictor.set_image`` and decodes batches of equal-length (or padded) prompts.

    ``pad_to`` is the token count every shorter prompt is padded to (0: no padding, exact SAM2
    masks; see the module docstring). ``autocast_bf16`` runs both under bfloat16 autocast (on CUDA
    only where the GPU supports bf16; otherwise the flag is refused at construction rather than
    silently ignored). ``chunk_size`` is the most prompts in one decoder call; 0 picks a default for
    the device.
    """

    predictor: object  # sam2.sam2_image_predictor.SAM2ImagePredictor; not imported to keep startup light
    autocast_bf16: bool = False
    chunk_size: int = 0
    pad_to: int = 0
    timings: SegmenterTimings = field(default_factory=SegmenterTimings)

    def __post_init__(self) -> None:
        if self.pad_to < 0:
            raise ValueError(f"pad_to must be >= 0 (0 = no padding), got {self.pad_to}")
        if self.chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 = device default), got {self.chunk_size}")
        if self.chunk_size == 0:
            self.chunk_size = DEFAULT_GPU_CHUNK if self.device.type == "cuda" else DEFAULT_CPU_CHUNK
        if self.autocast_bf16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"autocast_bf16=True but {torch.cuda.get_device_name(self.device)} has no bf16")

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @property
    def model(self):
        return self.predictor.model

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _sync(self) -> None:
        # CUDA work is asynchronous; without this the encoder's time would be billed to the decoder.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> Sam2Embedding:
        """Encode an RGB uint8 (H, W, 3) image."""
        image = rgb_image(np.asarray(image), "Sam2Segmenter.embed")
        start = time.perf_counter()
        with self._autocast():
            self.predictor.set_image(image)
        features = self.predictor._features
        height, width = self.predictor._orig_hw[0]
        # The embedding now lives in the returned value only; a stale image cannot leak into a later call.
        self.predictor.reset_predictor()
        self._sync()
        self.timings.encode_s += time.perf_counter() - start
        self.timings.images += 1
        return Sam2Embedding(features["image_embed"], tuple(features["high_res_feats"]), int(height), int(width))

    @torch.inference_mode()
    def decode(self, embedding: Sam2Embedding, prompts: Sequence[MaskPrompt]) -> list[np.ndarray]:
        """One bool (H, W) mask per prompt; a prompt with neither box nor points gives an empty mask.

        Identical prompts are decoded once: a policy that has converged writes the same answer in
        many samples of a group, and SAM2 would give each of them the same mask anyway.
        """
        start = time.perf_counter()
        first: dict[tuple, int] = {}  # prompt key -> index of its first occurrence
        owner = [first.setdefault(_key(p), i) for i, p in enumerate(prompts)]
        unique = sorted(set(owner))
        decoded: dict[int, np.ndarray] = {}
        for length, indices in self._batches([prompts[i] for i in unique]):
            batch = [unique[j] for j in indices]
            decoded.update(zip(batch, self._decode_batch(embedding, [prompts[i] for i in batch], length)))
        masks = []
        for i, o in enumerate(owner):
            if o not in decoded:  # nothing to decode: no box, no points
                masks.append(np.zeros((embedding.height, embedding.width), dtype=bool))
            else:  # a duplicate gets its own copy, so callers may write to what they get
                masks.append(decoded[o] if i == o else decoded[o].copy())
        self.timings.decode_s += time.perf_counter() - start
        self.timings.prompts += len(prompts)
        self.timings.decoded += len(decoded)
        return masks

    def _batches(self, prompts: Sequence[MaskPrompt]) -> Iterator[tuple[int, list[int]]]:
        """(padded length, indices) of prompts grouped by padded token count, in chunks of at most
        ``chunk_size``."""
        by_length: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            length = num_tokens(prompt)
            if length:
                by_length.setdefault(max(length, self.pad_to), []).append(i)
        for length, indices in by_length.items():
            for lo in range(0, len(indices), self.chunk_size):
                yield length, indices[lo : lo + self.chunk_size]

    def _decode_batch(self, embedding: Sam2Embedding, prompts: list[MaskPrompt], length: int) -> list[np.ndarray]:
        coords, labels = _stack_prompts(prompts, length)
        points = (self._to_model_frame(coords, embedding), torch.as_tensor(labels, device=self.device))
        encoder = self.model.sam_prompt_encoder
        with self._autocast():
            # As in _predict: boxes travel as two labelled points, so the encoder adds exactly one
            # not-a-point token to every prompt (after ours, if any), the same for a batch as for one.
            sparse, dense = encoder(points=points, boxes=None, masks=None)
            low_res, _, _, _ = self.model.sam_mask_decoder(
                image_embeddings=embedding.image_embed,
                image_pe=encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
                repeat_image=len(prompts) > 1,
                high_res_features=list(embedding.high_res_feats),
            )
            logits = self.predictor._transforms.postprocess_masks(low_res, (embedding.height, embedding.width))
        self.timings.batches += 1
        masks = (logits[:, 0] > self.predictor.mask_threshold).cpu().numpy()
        return list(masks)

    def _to_model_frame(self, coords: np.ndarray, embedding: Sam2Embedding) -> torch.Tensor:
        """Pixel (x, y) to SAM2's input frame, with the float32 operations of ``transform_coords``."""
        frame = torch.as_tensor(coords, dtype=torch.float, device=self.device)
        frame[..., 0] = frame[..., 0] / embedding.width
        frame[..., 1] = frame[..., 1] / embedding.height
        return frame * self.model.image_size


def _key(prompt: MaskPrompt) -> tuple[bytes | None, bytes, bytes]:
    """Equal exactly when two prompts ask SAM2 the same thing."""
    box = None if prompt.box is None else np.asarray(prompt.box, dtype=np.float64).tobytes()
    points = np.asarray(prompt.points, dtype=np.float64).tobytes()
    labels = np.asarray(prompt.labels, dtype=np.int64).tobytes()
    return box, points, labels


def num_tokens(prompt: MaskPrompt) -> int:
    """Prompt tokens before SAM2's padding point: two box corners plus the points."""
    return (2 if prompt.box is not None else 0) + len(prompt.points)


_NOT_A_POINT = -1  # SAM's padding label: embedded as a learned token, its coordinates are ignored


def _stack_prompts(prompts: list[MaskPrompt], length: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, length, 2) float coordinates and (B, length) int32 labels, box corners first, each prompt
    padded with not-a-point tokens up to ``length``."""
    coords, labels = [], []
    for prompt in prompts:
        c = np.asarray(prompt.points, dtype=np.float64).reshape(-1, 2)
        lab = np.asarray(prompt.labels, dtype=np.int32).reshape(-1)
        if len(c) != len(lab):
            raise ValueError(f"prompt has {len(c)} points but {len(lab)} labels")
        if prompt.box is not None:
            c = np.concatenate([np.asarray(prompt.box, dtype=np.float64).reshape(2, 2), c])
            lab = np.concatenate([np.array(_BOX_LABELS, dtype=np.int32), lab])
        if len(lab) > length:
            raise ValueError(f"prompt has {len(lab)} tokens, more than the batch's {length}")
        pad = length - len(lab)
        coords.append(np.concatenate([c, np.zeros((pad, 2))]))
        labels.append(np.concatenate([lab, np.full(pad, _NOT_A_POINT, dtype=np.int32)]))
    return np.stack(coords), np.stack(labels)


def load_sam2_segmenter(
    config: str,
    checkpoint: str | Path,
    image_size: int | None = None,
    device: str = "cpu",
    autocast_bf16: bool = False,
    chunk_size: int = 0,
    pad_to: int = 0,
) -> Sam2Segmenter:
    """Build SAM2 once from a config name inside the sam2 package and a checkpoint, on ``device``."""
    from segr1.segmenters.sam2_model import load_sam2_predictor

    predictor = load_sam2_predictor(config, checkpoint, image_size=image_size, device=device)
    return Sam2Segmenter(predictor, autocast_bf16=autocast_bf16, chunk_size=chunk_size, pad_to=pad_to)
