"""From a parsed prompt set to a mask, the Seg-R1 way, against any segmenter.

Each box is decoded together with the points that fall inside it and the boxes' masks are OR-ed;
with no box, all points form one prompt; with nothing, the mask is empty. The reward actors and the
evaluation both call ``masks_for_group`` so the two can never disagree on this rule.

A ``Segmenter`` embeds an image once and decodes many prompts on that embedding. ``masks_for_group``
gathers the prompts of a whole GRPO group into one ``decode`` call, because the image encoder costs
about fifty decodes and a batched decode is the win on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from segr1.core.parser import PromptSet


@dataclass(frozen=True, eq=False)
class MaskPrompt:
    """One decode request in the segmenter image's pixels: an optional box (x1, y1, x2, y2), points
    (n, 2) as x, y, and labels (n,) with 1 = object, 0 = background."""

    box: np.ndarray | None
    points: np.ndarray
    labels: np.ndarray


class Segmenter(Protocol):
    """Image embedding plus batched prompt decoding; SAM2 and ``BoxSegmenter`` implement it."""

    def embed(self, image: np.ndarray) -> Any:
        """Encode an RGB uint8 (H, W, 3) image once."""
        ...

    def decode(self, embedding: Any, prompts: Sequence[MaskPrompt]) -> list[np.ndarray]:
        """One bool (H, W) mask per prompt, at the embedded image's size."""
        ...


def _check_size(size: tuple[int, int], name: str) -> tuple[int, int]:
    w, h = int(size[0]), int(size[1])
    if w <= 0 or h <= 0:
        raise ValueError(f"{name} must be a positive (width, height), got {size}")
    return w, h


def prompts_for(
    prompt_set: PromptSet, policy_size: tuple[int, int], image_size: tuple[int, int]
) -> list[MaskPrompt]:
    """The decode requests for one prompt set, scaled from policy pixels to segmenter-image pixels.

    A point belongs to a box when it lies inside it, edges included; points outside every box are
    dropped, as in the paper's code.
    """
    pw, ph = _check_size(policy_size, "policy_size")
    iw, ih = _check_size(image_size, "image_size")
    scale = np.array([iw / pw, ih / ph])
    points, labels = prompt_set.points, prompt_set.labels
    if len(prompt_set.boxes) == 0:
        if len(points) == 0:
            return []
        return [MaskPrompt(None, points * scale, labels.copy())]
    prompts = []
    for box in prompt_set.boxes:
        inside = (
            (points[:, 0] >= box[0]) & (points[:, 0] <= box[2]) & (points[:, 1] >= box[1]) & (points[:, 1] <= box[3])
        )
        prompts.append(MaskPrompt(box * np.tile(scale, 2), points[inside] * scale, labels[inside].copy()))
    return prompts


def geometry_key(prompt_set: PromptSet) -> tuple[bytes, bytes, bytes, int, int]:
    """What a prompt set's mask depends on: its boxes, points and labels (not its text or format).
    Equal keys decode to the same mask."""
    boxes, points = np.ascontiguousarray(prompt_set.boxes, float), np.ascontiguousarray(prompt_set.points, float)
    labels = np.ascontiguousarray(prompt_set.labels, np.int64)
    return boxes.tobytes(), points.tobytes(), labels.tobytes(), len(boxes), len(points)


def masks_for_group(
    segmenter: Segmenter,
    embedding: Any,
    prompt_sets: Sequence[PromptSet],
    policy_size: tuple[int, int],
    image_size: tuple[int, int],
) -> list[np.ndarray]:
    """One bool (H, W) mask per prompt set, all decoded on one embedding in at most one call.

    Prompt sets with the same geometry (``geometry_key``: common once the policy's entropy falls)
    are decoded once and share one mask array, which callers must not modify in place."""
    iw, ih = _check_size(image_size, "image_size")
    first: dict[tuple, int] = {}
    owner_of = [first.setdefault(geometry_key(ps), index) for index, ps in enumerate(prompt_sets)]
    requests: list[MaskPrompt] = []
    owners: list[int] = []
    for index in sorted(set(owner_of)):
        for prompt in prompts_for(prompt_sets[index], policy_size, image_size):
            requests.append(prompt)
            owners.append(index)
    distinct = {index: np.zeros((ih, iw), dtype=bool) for index in set(owner_of)}
    if requests:
        decoded = segmenter.decode(embedding, requests)
        if len(decoded) != len(requests):
            raise ValueError(f"{type(segmenter).__name__}.decode returned {len(decoded)} masks for "
                             f"{len(requests)} prompts")
        for owner, mask in zip(owners, decoded):
            if mask.shape != (ih, iw):
                raise ValueError(f"{type(segmenter).__name__}.decode returned a {mask.shape} mask, expected {(ih, iw)}")
            distinct[owner] |= mask.astype(bool, copy=False)
    return [distinct[index] for index in owner_of]


def segment_image(
    segmenter: Segmenter, image: np.ndarray, prompt_set: PromptSet, policy_size: tuple[int, int]
) -> np.ndarray:
    """The bool (H, W) mask of ``image`` for one answer: ``masks_for_group`` of one prompt set, with
    no encode when the answer holds no prompt (evaluation in-process, serving, batch prediction)."""
    embedding = None if prompt_set.is_empty else segmenter.embed(image)
    return masks_for_group(segmenter, embedding, [prompt_set], policy_size, (image.shape[1], image.shape[0]))[0]


@dataclass(frozen=True)
class ImageShape:
    """``BoxSegmenter``'s embedding: it only needs the image size."""

    height: int
    width: int


@dataclass(frozen=True)
class BoxSegmenter:
    """A deterministic stand-in for SAM2: the mask is the filled box plus a disc around each positive
    point; negative points carve nothing.

    It exists to check that training learns (the best prompt is knowable) and for ablations. It is
    never the default segmenter. A box covers the pixel columns ``floor(x1)`` up to ``ceil(x2)``
    (exclusive, at least one); a disc covers the pixels whose centre-index ``(col, row)`` lies within
    ``point_radius`` of the point.
    """

    point_radius: float

    def __post_init__(self) -> None:
        if not self.point_radius >= 0:
            raise ValueError(f"BoxSegmenter.point_radius must be >= 0, got {self.point_radius}")

    def embed(self, image: np.ndarray) -> ImageShape:
        if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"BoxSegmenter.embed expects an (H, W[, C]) image, got shape {image.shape}")
        return ImageShape(int(image.shape[0]), int(image.shape[1]))

    def decode(self, embedding: ImageShape, prompts: Sequence[MaskPrompt]) -> list[np.ndarray]:
        return [self._decode_one(embedding.height, embedding.width, prompt) for prompt in prompts]

    def _decode_one(self, h: int, w: int, prompt: MaskPrompt) -> np.ndarray:
        mask = np.zeros((h, w), dtype=bool)
        if prompt.box is not None:
            x1, y1, x2, y2 = prompt.box
            c0, r0 = int(np.floor(x1)), int(np.floor(y1))
            c1, r1 = max(int(np.ceil(x2)), c0 + 1), max(int(np.ceil(y2)), r0 + 1)
            mask[max(r0, 0) : min(r1, h), max(c0, 0) : min(c1, w)] = True
        radius = self.point_radius
        rows = np.arange(h)[:, None]
        cols = np.arange(w)[None, :]
        for (x, y), label in zip(prompt.points, prompt.labels):
            if label != 1:
                continue
            r_lo, r_hi = max(int(np.floor(y - radius)), 0), min(int(np.ceil(y + radius)) + 1, h)
            c_lo, c_hi = max(int(np.floor(x - radius)), 0), min(int(np.ceil(x + radius)) + 1, w)
            if r_lo >= r_hi or c_lo >= c_hi:
                continue
            window = (cols[:, c_lo:c_hi] - x) ** 2 + (rows[r_lo:r_hi] - y) ** 2 <= radius**2
            mask[r_lo:r_hi, c_lo:c_hi] |= window
        return mask
