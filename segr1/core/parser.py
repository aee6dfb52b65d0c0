"""Parse a policy completion into a typed prompt set for the segmenter.

The policy writes free text; training must survive whatever it writes. This parser therefore never
raises and never evaluates text: it scans for the answer tags with linear-time searches, reads each
tag body with a small tokenizer that only knows brackets, commas and numbers, and records a reason
for everything it rejects so the driver can log it.

Rules (see docs/core.md for the reasoning):

* ``<think>...</think>`` counts only when it is closed and holds non-blank text. The answer tags are
  read from the text after the last ``</think>``, so drafts inside the reasoning are not prompts.
* ``<bbox>`` may appear several times; one tag holds one box ``[x1,y1,x2,y2]`` or a list of boxes.
* ``<points>`` holds ``[[x,y],...]`` (a bare ``[x,y]`` is one point); ``<labels>`` holds ``[1,0,...]``
  with every label 0 (background) or 1 (object). Points and labels must have the same count; points
  without labels are rejected because a point's meaning depends on its label.
* Each part is all-or-nothing: one bad element (not a number, wrong arity, NaN, absurd magnitude, a
  label outside {0, 1}, more elements than the limit) rejects the whole part.
* Coordinates are clipped to the image, ``[0, w] x [0, h]``; box corners are ordered.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
# One token per match; every alternative consumes at least one character and none can backtrack
# into another, so tokenizing is linear in the tag body.
_TOKEN = re.compile(r"\s*(?:(\[)|(\])|(,)|(" + _NUMBER + r"))")
_MAX_DEPTH = 3


@dataclass(frozen=True)
class ParserLimits:
    """Bounds on what a completion may ask of the segmenter.

    ``max_abs_coord`` separates a sloppy coordinate (a few pixels outside the image, clipped) from a
    nonsense one (rejected). ``max_chars`` bounds the work done on one completion.
    """

    max_boxes: int = 8
    max_points: int = 32
    max_abs_coord: float = 1e4
    max_chars: int = 16384

    def __post_init__(self) -> None:
        for name in ("max_boxes", "max_points", "max_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"ParserLimits.{name} must be >= 0, got {getattr(self, name)}")
        if not self.max_abs_coord > 0:
            raise ValueError(f"ParserLimits.max_abs_coord must be > 0, got {self.max_abs_coord}")


@dataclass(frozen=True)
class AnswerFormat:
    """Which parts a task's answer must contain (points and labels are always required)."""

    think: bool
    boxes: bool


RL_FORMAT = AnswerFormat(think=True, boxes=True)
PRERL_FORMAT = AnswerFormat(think=False, boxes=False)


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class PromptSet:
    """What the policy asked for, in the policy image's pixel coordinates.

    ``boxes`` is (k, 4) as x1, y1, x2, y2 with x1 <= x2 and y1 <= y2; ``points`` is (n, 2) as x, y;
    ``labels`` is (n,) with 1 = object and 0 = background. The ``has_*`` flags say a part was present
    and accepted; ``errors`` holds one reason per rejection.
    """

    boxes: np.ndarray = field(default_factory=lambda: _frozen(np.zeros((0, 4))))
    points: np.ndarray = field(default_factory=lambda: _frozen(np.zeros((0, 2))))
    labels: np.ndarray = field(default_factory=lambda: _frozen(np.zeros(0, dtype=np.int64)))
    think: str | None = None
    has_think: bool = False
    has_boxes: bool = False
    has_points: bool = False
    has_labels: bool = False
    errors: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to give the segmenter (reward 0, empty mask)."""
        return len(self.boxes) == 0 and len(self.points) == 0

    def complete(self, fmt: AnswerFormat) -> bool:
        """True when every part ``fmt`` requires is present, nothing was rejected and there is a prompt."""
        return (
            (self.has_think or not fmt.think)
            and (self.has_boxes or not fmt.boxes)
            and self.has_points
            and self.has_labels
            and not self.errors
            and not self.is_empty
        )


def _tokenize(body: str) -> list[str] | str:
    """Split a tag body into '[', ']', ',' and number tokens, or return an error message."""
    tokens: list[str] = []
    pos = 0
    end = len(body.rstrip())
    while pos < end:
        match = _TOKEN.match(body, pos)
        if match is None:
            return f"unexpected text {body[pos:pos + 20].strip()!r}"
        tokens.append(match.group(match.lastindex))
        pos = match.end()
    return tokens


def _read_list(body: str, limits: ParserLimits) -> list | str:
    """Read a bracketed, possibly nested list of finite numbers, or return an error message."""
    tokens = _tokenize(body)
    if isinstance(tokens, str):
        return tokens
    if not tokens or tokens[0] != "[":
        return "expected a bracketed list"
    stack: list[list] = []
    result: list | None = None
    expect_value = True  # after '[' or ',' a value must follow; after a value, ',' or ']'
    for i, token in enumerate(tokens):
        if result is not None:
            return "text after the closing bracket"
        if token == "[":
            if not expect_value:
                return "missing comma before '['"
            if len(stack) == _MAX_DEPTH:
                return f"lists nested deeper than {_MAX_DEPTH}"
            stack.append([])
        elif token == "]":
            if tokens[i - 1] == ",":
                return "trailing comma"
            done = stack.pop()
            if stack:
                stack[-1].append(done)
            else:
                result = done
            expect_value = False
            continue
        elif token == ",":
            if expect_value:
                return "misplaced comma"
        else:
            if not expect_value:
                return "missing comma between numbers"
            value = float(token)
            if not math.isfinite(value):
                return f"non-finite number {token!r}"
            if abs(value) > limits.max_abs_coord:
                return f"absurd magnitude {token!r} (limit {limits.max_abs_coord:g})"
            stack[-1].append(value)
            expect_value = False
            continue
        expect_value = True
    if result is None:
        return "unclosed '['"
    return result


def _rows(values: list, width: int, what: str) -> np.ndarray | str:
    """A flat list of ``width`` numbers is one row; a list of such lists is several."""
    if values and all(isinstance(v, float) for v in values):
        values = [values]
    rows = []
    for row in values:
        if not isinstance(row, list) or not all(isinstance(v, float) for v in row):
            return f"{what} must be lists of {width} numbers"
        if len(row) != width:
            return f"{what} need {width} numbers, got {len(row)}"
        rows.append(row)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), width)


def _tag_bodies(text: str, tag: str) -> list[str]:
    """Bodies of every ``<tag>...</tag>`` in order, found by linear scanning (no regex backtracking)."""
    opening, closing = f"<{tag}>", f"</{tag}>"
    bodies = []
    start = text.find(opening)
    while start >= 0:
        body_start = start + len(opening)
        stop = text.find(closing, body_start)
        if stop < 0:
            break
        bodies.append(text[body_start:stop])
        start = text.find(opening, stop + len(closing))
    return bodies


def _split_think(text: str) -> tuple[str | None, str]:
    """Return the think text (None unless closed and non-blank) and the text to read the answer from."""
    close = text.rfind("</think>")
    if close < 0:
        return None, text
    answer = text[close + len("</think>"):]
    start = text.find("<think>")
    if start < 0 or start > close:
        return None, answer
    think = text[start + len("<think>"):close].strip()
    return (think or None), answer


def _parse_boxes(bodies: list[str], limits: ParserLimits, w: int, h: int) -> np.ndarray | str:
    parts = []
    for body in bodies:
        values = _read_list(body, limits)
        if isinstance(values, str):
            return f"<bbox>: {values}"
        rows = _rows(values, 4, "boxes")
        if isinstance(rows, str):
            return f"<bbox>: {rows}"
        parts.append(rows)
    boxes = np.concatenate(parts)
    if len(boxes) == 0:
        return "<bbox>: no box given"
    if len(boxes) > limits.max_boxes:
        return f"<bbox>: {len(boxes)} boxes, limit {limits.max_boxes}"
    ordered = np.stack(
        [
            np.minimum(boxes[:, 0], boxes[:, 2]),
            np.minimum(boxes[:, 1], boxes[:, 3]),
            np.maximum(boxes[:, 0], boxes[:, 2]),
            np.maximum(boxes[:, 1], boxes[:, 3]),
        ],
        axis=1,
    )
    return np.clip(ordered, 0.0, [w, h, w, h])


def _parse_points(body: str, limits: ParserLimits, w: int, h: int) -> np.ndarray | str:
    values = _read_list(body, limits)
    if isinstance(values, str):
        return f"<points>: {values}"
    points = _rows(values, 2, "points")
    if isinstance(points, str):
        return f"<points>: {points}"
    if len(points) > limits.max_points:
        return f"<points>: {len(points)} points, limit {limits.max_points}"
    return np.clip(points, 0.0, [w, h])


def _parse_labels(body: str, limits: ParserLimits) -> np.ndarray | str:
    values = _read_list(body, limits)
    if isinstance(values, str):
        return f"<labels>: {values}"
    if not all(isinstance(v, float) for v in values):
        return "<labels>: must be a flat list"
    if any(v not in (0.0, 1.0) for v in values):
        return "<labels>: every label must be 0 or 1"
    return np.asarray(values, dtype=np.int64)


def _single_body(text: str, tag: str, errors: list[str]) -> str | None:
    bodies = _tag_bodies(text, tag)
    if len(bodies) > 1:
        errors.append(f"<{tag}>: appears {len(bodies)} times, expected once")
        return None
    return bodies[0] if bodies else None


def parse_completion(
    text: object, image_size: tuple[int, int], limits: ParserLimits | None = None
) -> PromptSet:
    """Parse ``text`` written for an image of ``image_size = (width, height)`` pixels.

    Never raises on any ``text``; a non-string or unreadable completion gives an empty prompt set
    whose ``errors`` say why.
    """
    limits = limits or ParserLimits()
    w, h = int(image_size[0]), int(image_size[1])
    if not isinstance(text, str):
        return PromptSet(errors=(f"completion is {type(text).__name__}, not str",))
    errors: list[str] = []
    if len(text) > limits.max_chars:
        errors.append(f"completion truncated from {len(text)} to {limits.max_chars} characters")
        text = text[: limits.max_chars]

    think, answer = _split_think(text)
    fields: dict = {"think": think, "has_think": think is not None}

    bbox_bodies = _tag_bodies(answer, "bbox")
    if bbox_bodies:
        boxes = _parse_boxes(bbox_bodies, limits, w, h)
        if isinstance(boxes, str):
            errors.append(boxes)
        else:
            fields.update(boxes=_frozen(boxes), has_boxes=True)

    points_body = _single_body(answer, "points", errors)
    labels_body = _single_body(answer, "labels", errors)
    points = _parse_points(points_body, limits, w, h) if points_body is not None else None
    labels = _parse_labels(labels_body, limits) if labels_body is not None else None
    for part in (points, labels):
        if isinstance(part, str):
            errors.append(part)
    if isinstance(points, np.ndarray) and isinstance(labels, np.ndarray):
        if len(points) == len(labels):
            fields.update(points=_frozen(points), labels=_frozen(labels), has_points=True, has_labels=True)
        else:
            errors.append(f"{len(points)} points but {len(labels)} labels")
    elif isinstance(points, np.ndarray) and len(points):
        errors.append("points without valid labels")
    elif isinstance(labels, np.ndarray) and len(labels):
        errors.append("labels without valid points")
    return PromptSet(errors=tuple(errors), **fields)
