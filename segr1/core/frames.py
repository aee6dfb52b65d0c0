"""The policy's pixel frame: the image as the Qwen2.5-VL processor resized it, and the way back.

Qwen2.5-VL never sees the stored image. Its processor resizes every image to sides that are
multiples of 28 (patch 14 x merge 2) whose area lies within ``min_pixels``/``max_pixels``, keeping
the aspect ratio as well as it can, and the model's coordinates live in that resized frame: a
768 px image is seen at 756, a 1024 px one at 1036 under Qwen2.5-VL-3B's bounds and at 756 under
a max of 768 x 768. An answer read in the stored image's frame is off by that ratio (1.6 % at 768,
35 % at 1024 -> 756), so every place an answer meets an image (rewards, SFT targets, evaluation,
pictures, serving) takes the frame from here and maps with ``segr1.core.segment.prompts_for`` (policy
frame -> image) or ``to_policy_frame`` (image -> policy frame).

Pure: no transformers import. ``policy_frame`` is the processor's own rule (``smart_resize`` in
transformers' ``image_processing_qwen2_vl``), cross-checked against it in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# The paper feeds the policy a square of 768 px for COD/SOD and 1024 px for referring and reasoning
# segmentation (evaluation and serving resize to it, then the processor to its frame).
DEFAULT_POLICY_SIZE = {"cod": 768, "sod": 768, "refer": 1024, "reason": 1024}
PATCH_FACTOR = 28  # Qwen2.5-VL: 14 px patches, merged 2 x 2 into one image token
MAX_ASPECT = 200  # the processor refuses images more elongated than this


@dataclass(frozen=True)
class PixelBounds:
    """The processor's image-area bounds and the side factor its resized sides are multiples of."""

    min_pixels: int
    max_pixels: int
    factor: int = PATCH_FACTOR

    def __post_init__(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"pixel bounds need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if self.factor < 1:
            raise ValueError(f"pixel bounds factor must be >= 1, got {self.factor}")

    def frame(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (width, height) the processor resizes a (width, height) image to."""
        return policy_frame(size, self)


def policy_frame(size: tuple[int, int], bounds: PixelBounds) -> tuple[int, int]:
    """(width, height) of an image of ``size`` (width, height) as the processor resizes it.

    Sides are rounded to the nearest multiple of ``factor``; if the area then leaves the bounds,
    both sides are scaled by one factor and rounded down (too large) or up (too small).
    """
    width, height = int(size[0]), int(size[1])
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be a positive (width, height), got {size}")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ValueError(f"image {width}x{height}: aspect ratio over {MAX_ASPECT}, the processor refuses it")
    f = bounds.factor
    h_bar, w_bar = round(height / f) * f, round(width / f) * f
    if h_bar * w_bar > bounds.max_pixels:
        beta = math.sqrt(height * width / bounds.max_pixels)
        h_bar = max(f, math.floor(height / beta / f) * f)
        w_bar = max(f, math.floor(width / beta / f) * f)
    elif h_bar * w_bar < bounds.min_pixels:
        beta = math.sqrt(bounds.min_pixels / (height * width))
        h_bar = math.ceil(height * beta / f) * f
        w_bar = math.ceil(width * beta / f) * f
    return w_bar, h_bar


def processor_bounds(processor: Any) -> PixelBounds:
    """The bounds a loaded Qwen2-VL-family processor (or its image processor) resizes with.

    transformers 5 keeps them as ``size["shortest_edge"]``/``size["longest_edge"]`` (areas, not
    edges, despite the names); the side factor is ``patch_size x merge_size``.
    """
    image_processor = getattr(processor, "image_processor", processor)
    size = image_processor.size
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    low, high = get("shortest_edge"), get("longest_edge")
    if low is None or high is None:
        raise ValueError(f"{type(image_processor).__name__}: no min/max pixel bounds in its size {size}")
    factor = int(image_processor.patch_size) * int(image_processor.merge_size)
    return PixelBounds(int(low), int(high), factor)


def processor_size(
    min_pixels: int | None, max_pixels: int | None, checkpoint: Callable[[], PixelBounds]
) -> dict[str, int] | None:
    """The Qwen2.5-VL processor's ``size`` for these image-area bounds; None when neither is set
    (the checkpoint's own apply).

    The rollout engines (in vLLM's ``mm_processor_kwargs``) and the learner (loading its processor)
    take the same ``size``, so both resize an image to the same grid and expand it into the same
    image tokens. ``size`` and not ``min_pixels``/``max_pixels``: transformers 5 keeps those as
    deprecated aliases and warns at every processor call that carries them. A ``size`` must hold
    both bounds, so where only one is set ``checkpoint()`` (the checkpoint's processor bounds, read
    only then) gives the other, as the aliases did.
    """
    if min_pixels is None and max_pixels is None:
        return None
    if min_pixels is None or max_pixels is None:
        own = checkpoint()
        min_pixels = own.min_pixels if min_pixels is None else min_pixels
        max_pixels = own.max_pixels if max_pixels is None else max_pixels
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"pixel bounds need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    return {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}


def to_policy_frame(
    xy: np.ndarray, image_size: tuple[int, int], policy_size: tuple[int, int]
) -> np.ndarray:
    """Coordinates (..., 2k) as x, y pairs in the image's pixels, mapped into the policy's frame.

    The inverse of the scaling in ``segr1.core.segment.prompts_for``: what an answer must say for the
    policy to point at these pixels (SFT targets are written with it).
    """
    scale = np.array([policy_size[0] / image_size[0], policy_size[1] / image_size[1]])
    values = np.asarray(xy, dtype=np.float64)
    return (values.reshape(*values.shape[:-1], -1, 2) * scale).reshape(values.shape)


def from_policy_frame(xy: np.ndarray, policy_size: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """Coordinates (..., 2k) in the policy's frame mapped to the image's pixels: the scaling
    ``segr1.core.segment.prompts_for`` gives the segmenter, for answers shown to a user."""
    return to_policy_frame(xy, policy_size, image_size)


def policy_image(image: np.ndarray, size: int) -> np.ndarray:
    """The image the policy is given: resized to size x size (bicubic), as in the paper; its
    processor then resizes that square to its frame."""
    from PIL import Image

    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def policy_side(task: str, configured: int | None) -> int:
    """The square side the policy is given: the configured one, else the paper's for the task."""
    return configured or DEFAULT_POLICY_SIZE[task]
