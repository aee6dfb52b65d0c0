"""Prompt templates for each task, and the canonical answer string the parser reads back.

The instructions follow the Seg-R1 recipe in our own words: reason inside ``<think></think>``, then
give prompts for the segmenter in the pixel coordinates of the image as the policy sees it. Messages
are plain chat dicts; ``render_prompt`` asks the model's own processor for its chat template, so this
module needs no transformers import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from segr1.core.parser import PRERL_FORMAT, RL_FORMAT, AnswerFormat

SYSTEM_PROMPT = (
    "You are a visual assistant that segments images by prompting a segmentation model. "
    "When asked, first reason about the image step by step inside <think> </think>, "
    "then give your answer in the tags the user asks for, and nothing after them."
)

_COORDINATES = (
    "All coordinates are pixel positions in this image: x counts columns from the left edge, "
    "y counts rows from the top edge."
)

_RL_ANSWER = (
    "Think inside <think></think> first. Then give one bounding box per object in <bbox></bbox>, "
    "a few points in <points></points>, and one label per point in <labels></labels>: "
    "1 for a point on the object, 0 for a point on the background. "
    + _COORDINATES
    + " Answer in exactly this format, with numbers in place of the names:\n"
    "<think>your reasoning</think> <bbox>[x1,y1,x2,y2]</bbox>, "
    "<points>[[x1,y1],[x2,y2],[x3,y3]]</points>, <labels>[1,1,0]</labels>"
)

_PRERL_ANSWER = (
    "Give a few points in <points></points> and one label per point in <labels></labels>: "
    "1 for a point on the object, 0 for a point on the background. "
    + _COORDINATES
    + " Answer in exactly this format, with numbers in place of the names:\n"
    "<points>[[x1,y1],[x2,y2],[x3,y3]]</points>, <labels>[1,1,0]</labels>"
)

_TASKS: dict[str, tuple[str, str, AnswerFormat, bool]] = {
    # task: (request, answer instructions, answer format, needs an expression)
    "cod": (
        "Find every camouflaged object in this image: animals or things whose colours and textures "
        "blend into their surroundings. Segment them.",
        _RL_ANSWER,
        RL_FORMAT,
        False,
    ),
    "sod": (
        "Find the most salient object in this image, the one that catches the eye first. Segment it.",
        _RL_ANSWER,
        RL_FORMAT,
        False,
    ),
    "prerl": (
        "Segment the main foreground object in this image, with all its fine structure.",
        _PRERL_ANSWER,
        PRERL_FORMAT,
        False,
    ),
    "refer": ("Identify and segment {expression}.", _RL_ANSWER, RL_FORMAT, True),
    "reason": (
        "Read the request below, work out which object in the image it means, and segment that "
        "object.\nRequest: {expression}",
        _RL_ANSWER,
        RL_FORMAT,
        True,
    ),
}
_TASKS["dis"] = _TASKS["prerl"]

TASKS = tuple(sorted(_TASKS))
TEXT_TASKS = tuple(task for task, spec in _TASKS.items() if spec[3])  # asked with an expression: refer, reason


def _task(task: str) -> tuple[str, str, AnswerFormat, bool]:
    try:
        return _TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}") from None


def answer_format(task: str) -> AnswerFormat:
    """The parts an answer to ``task`` must contain (used by the format reward)."""
    return _task(task)[2]


def build_messages(task: str, expression: str | None = None) -> list[dict[str, Any]]:
    """Chat messages for one sample: a system turn and a user turn holding the image and the request.

    ``expression`` is the referring expression ("refer") or the request ("reason"); the other tasks
    take none, and passing one is an error rather than silently ignored.
    """
    request, answer, _, needs_expression = _task(task)
    if needs_expression:
        if expression is None or not expression.strip():
            raise ValueError(f"task {task!r} needs a non-empty expression")
        request = request.format(expression=expression.strip())
    elif expression is not None:
        raise ValueError(f"task {task!r} takes no expression, got {expression!r}")
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"{request}\n{answer}"}]},
    ]


def render_prompt(processor: Any, messages: list[dict[str, Any]]) -> str:
    """Render ``messages`` with the processor's chat template, ready for generation."""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class PromptRenderer:
    """``render_prompt`` with ``processor`` for a task and expression; the expression-less prompts
    (COD, SOD, DIS) are the same for every image, so each is rendered once."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self._fixed: dict[str, str] = {}

    def __call__(self, task: str, expression: str | None = None) -> str:
        if expression is not None:
            return render_prompt(self.processor, build_messages(task, expression))
        if task not in self._fixed:
            self._fixed[task] = render_prompt(self.processor, build_messages(task))
        return self._fixed[task]


def _number(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}" if decimals > 0 else str(int(value))


def _list(values: np.ndarray, decimals: int) -> str:
    return "[" + ",".join(_number(v, decimals) for v in values) + "]"


def answer_text(
    boxes: Sequence[Sequence[float]] | np.ndarray | None = None,
    points: Sequence[Sequence[float]] | np.ndarray = (),
    labels: Sequence[int] | np.ndarray = (),
    think: str | None = None,
    decimals: int = 0,
) -> str:
    """The canonical answer string: what the SFT warm start teaches and ``parse_completion`` reads.

    Coordinates are rounded to ``decimals`` places (whole pixels by default). ``boxes=None`` leaves
    out the box part (pre-RL format); ``think=None`` leaves out the reasoning.
    """
    points = np.round(np.asarray(points, dtype=np.float64).reshape(-1, 2), decimals)
    labels = np.asarray(labels).reshape(-1)
    if len(points) != len(labels):
        raise ValueError(f"answer_text: {len(points)} points but {len(labels)} labels")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"answer_text: labels must be 0 or 1, got {labels.tolist()}")
    parts = []
    if boxes is not None:
        boxes = np.round(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), decimals)
        if len(boxes):
            parts.append("".join(f"<bbox>{_list(box, decimals)}</bbox>" for box in boxes))
    points_text = "[" + ",".join(_list(p, decimals) for p in points) + "]"
    parts.append(f"<points>{points_text}</points>")
    parts.append("<labels>[" + ",".join(str(int(v)) for v in labels) + "]</labels>")
    answer = ", ".join(parts)
    return answer if think is None else f"<think>{think}</think> {answer}"
