"""One image in, one answer out: the steps ``segr1 serve`` and ``segr1 predict`` share, without Ray.

A query is checked (``check_query``) and its image decoded under a pixel limit (``read_image``)
before any model sees it, so bad input is a clear error and never reaches a replica. The policy is
given the image as evaluation gives it (``PolicyPrompts``: the paper's square, then the
processor's frame); its completion is parsed in that frame, SAM2 segments the uploaded image
(``segr1.core.segment.segment_image``),
and ``answer_json`` reports the boxes and points in the uploaded image's pixels with the mask as a
PNG of the uploaded image's size.
"""

from __future__ import annotations

import base64
import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from segr1.config import Config
from segr1.core.frames import from_policy_frame, policy_image, policy_side, processor_bounds
from segr1.core.parser import PromptSet
from segr1.core.policy import ModelSettings
from segr1.core.prompts import TEXT_TASKS, PromptRenderer
from segr1.core.schema import PromptItem
from segr1.data.records import encode_mask

TASKS = ("cod", "sod", "refer", "reason")
MAX_EXPRESSION_CHARS = 1000


class BadInput(ValueError):
    """A request the service refuses; ``status`` is its HTTP status, the message names the input."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Query:
    task: str
    expression: str | None = None


def check_query(task: str | None, expression: str | None) -> Query:
    """The task and, for the text tasks, a non-blank expression; anything else is ``BadInput``."""
    if not task:
        raise BadInput(400, f"task: missing; expected one of {', '.join(TASKS)}")
    if task not in TASKS:
        raise BadInput(400, f"task {task!r}: unknown; expected one of {', '.join(TASKS)}")
    expression = (expression or "").strip() or None
    if task in TEXT_TASKS and expression is None:
        raise BadInput(400, f"expression: task {task!r} segments what an expression describes; none was given")
    if task not in TEXT_TASKS and expression is not None:
        raise BadInput(400, f"expression: task {task!r} takes no expression (only {', '.join(TEXT_TASKS)} do)")
    if expression is not None and len(expression) > MAX_EXPRESSION_CHARS:
        raise BadInput(400, f"expression: {len(expression)} characters, over the limit of {MAX_EXPRESSION_CHARS}")
    return Query(task, expression)


def read_image(data: bytes, max_pixels: int, name: str = "image") -> np.ndarray:
    """A uint8 (H, W, 3) RGB array, upright as a browser shows it (EXIF orientation applied).

    The size is read from the header before any pixel is decoded, so an image over ``max_pixels``
    (or a decompression bomb) costs nothing; a file that is not an image is 415, a large one 413.
    """
    if not data:
        raise BadInput(400, f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(data))
            width, height = picture.size
            if width * height > max_pixels:
                raise BadInput(413, f"{name}: {width}x{height} = {width * height} pixels, over the limit of "
                                    f"{max_pixels}")
            picture = ImageOps.exif_transpose(picture).convert("RGB")
    except BadInput:
        raise
    except Exception as err:  # PIL raises several unrelated types for bytes that are not an image
        raise BadInput(415, f"{name}: not an image this service can read ({type(err).__name__}: {err})") from err
    return np.asarray(picture)


class PolicyPrompts:
    """The policy's prompt for an image, as evaluation gives it: the image resized to the paper's
    square (or ``policy_size``), and the frame the policy's processor (``model``'s bounds, the
    engines' too) turns that square into, which the answer's coordinates are in."""

    def __init__(self, model: ModelSettings, policy_size: int | None) -> None:
        from learner.inputs import load_processor

        processor = load_processor(model.path, model.min_pixels, model.max_pixels)
        self.bounds, self.renderer = processor_bounds(processor), PromptRenderer(processor)
        self.policy_size = policy_size

    def item(self, request_id: str, query: Query, image: np.ndarray) -> PromptItem:
        side = policy_side(query.task, self.policy_size)
        return PromptItem(
            group_id=request_id,
            record_id=request_id,
            prompt=self.renderer(query.task, query.expression),
            image=np.ascontiguousarray(policy_image(image, side)),
            policy_size=self.bounds.frame((side, side)),
            task=query.task,
        )


def model_gpus(config: Config, cluster_gpus: float) -> tuple[float, float]:
    """GPUs of one policy engine and of one SAM2 copy: the ``rollout``/``reward`` settings' on a
    cluster with GPUs (SAM2 only with its real backend), none otherwise."""
    if cluster_gpus <= 0:
        return 0.0, 0.0
    sam2 = config.reward.num_gpus_per_actor if config.sam2.backend == "sam2" else 0.0
    return float(config.rollout.num_gpus_per_actor), sam2


def answer_fields(
    completion: str, prompt_set: PromptSet, policy_size: tuple[int, int], mask: np.ndarray
) -> dict[str, Any]:
    """What a user reads of an answer: coordinates in the image's pixels (``mask``'s size), the
    reasoning, the raw completion and anything the parser refused."""
    image_size = (mask.shape[1], mask.shape[0])

    def pixels(values: np.ndarray) -> list[list[float]]:
        return np.round(from_policy_frame(values, policy_size, image_size), 1).tolist() if len(values) else []

    return {
        "think": prompt_set.think,
        "boxes": pixels(prompt_set.boxes),
        "points": pixels(prompt_set.points),
        "labels": [int(label) for label in prompt_set.labels],
        "image_size": list(image_size),
        "mask_pixels": int(mask.sum()),
        "completion": completion,
        "parse_errors": list(prompt_set.errors),
    }


def answer_json(
    completion: str, prompt_set: PromptSet, policy_size: tuple[int, int], mask: np.ndarray,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The service's answer: ``answer_fields``, the mask as a base64 PNG of the uploaded image's
    size and what each stage took (ms)."""
    return {
        **answer_fields(completion, prompt_set, policy_size, mask),
        "mask_png": base64.b64encode(encode_mask(mask)).decode("ascii"),
        "timings": {name: round(ms, 1) for name, ms in timings.items()},
    }
