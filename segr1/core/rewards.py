"""Seg-R1 rewards: format plus segmentation quality, every part returned for logging.

``total = format_w x format + iou_w x IoU + smeasure_w x S-measure + point_count_w x point_count``

* format is 1 when the answer holds every part its task requires (``PromptSet.complete``) and 0
  otherwise. There is no partial credit: paying for parts lets the policy collect reward with half
  answers, and the paper's reward is all-or-nothing too.
* IoU and S-measure compare the decoded mask with the true binary ground truth. The paper's code
  binarised an already-0/1 mask at 128, so its S-measure term scored against an empty mask;
  ``metrics.as_gt`` refuses anything but a 0/1 mask, so that cannot happen here.
* A completion that gives no prompt at all gets 0 for segmentation (and for format), whatever the
  ground truth: an empty answer must never be rewarded, not even on an empty ground truth.
* point_count (weight 0 by default) is 1 when the number of points lies in
  ``[points_min, points_max]``, a nudge against answers with no points or a flood of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from segr1.core.metrics import as_gt, as_pred, iou, smeasure
from segr1.core.parser import RL_FORMAT, AnswerFormat, PromptSet


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the reward parts; the defaults are the paper's (1 format + 0.7 IoU + 0.3 S-measure)."""

    format: float = 1.0
    iou: float = 0.7
    smeasure: float = 0.3
    point_count: float = 0.0
    points_min: int = 1
    points_max: int = 10

    def __post_init__(self) -> None:
        for name in ("format", "iou", "smeasure", "point_count"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"RewardWeights.{name} must be a finite number >= 0, got {value}")
        if not 0 <= self.points_min <= self.points_max:
            raise ValueError(
                f"RewardWeights needs 0 <= points_min <= points_max, got {self.points_min}, {self.points_max}"
            )


@dataclass(frozen=True)
class RewardParts:
    """One sample's reward and its parts; ``segmentation`` is the weighted IoU + S-measure term."""

    total: float
    format: float
    iou: float
    smeasure: float
    segmentation: float
    point_count: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def mask_quality(prompt_set: PromptSet, pred_mask: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """(IoU, S-measure) of a decoded mask against a checked ground truth; (0, 0) for no prompt."""
    pred = as_pred(pred_mask, gt)
    if pred.dtype != bool:
        raise ValueError("score expects a binary mask from the segmenter, got a float map")
    if prompt_set.is_empty:
        return 0.0, 0.0
    return iou(pred, gt), smeasure(pred, gt)


def score(
    prompt_set: PromptSet,
    pred_mask: np.ndarray,
    gt_mask: np.ndarray,
    weights: RewardWeights | None = None,
    fmt: AnswerFormat = RL_FORMAT,
    quality: tuple[float, float] | None = None,
) -> RewardParts:
    """Score one completion's prompt set and the mask decoded from it against the ground truth.
    ``quality``: the mask's (IoU, S-measure) when already known (another sample's same mask)."""
    weights = weights or RewardWeights()
    iou_value, sm_value = quality if quality is not None else mask_quality(prompt_set, pred_mask, as_gt(gt_mask))
    format_value = 1.0 if prompt_set.complete(fmt) else 0.0
    n_points = len(prompt_set.points)
    count_value = 1.0 if weights.points_min <= n_points <= weights.points_max else 0.0
    segmentation = weights.iou * iou_value + weights.smeasure * sm_value
    total = weights.format * format_value + segmentation + weights.point_count * count_value
    return RewardParts(
        total=total,
        format=format_value,
        iou=iou_value,
        smeasure=sm_value,
        segmentation=segmentation,
        point_count=count_value,
    )


def score_group(
    prompt_sets: Sequence[PromptSet],
    pred_masks: Sequence[np.ndarray],
    gt_mask: np.ndarray,
    weights: RewardWeights | None = None,
    fmt: AnswerFormat = RL_FORMAT,
) -> list[RewardParts]:
    """``score`` for every candidate of one GRPO group, which shares one ground truth; a mask array
    shared by several candidates (``segment.masks_for_group`` decodes equal geometry once) is
    compared with the ground truth once."""
    if len(prompt_sets) != len(pred_masks):
        raise ValueError(f"score_group: {len(prompt_sets)} prompt sets but {len(pred_masks)} masks")
    gt = as_gt(gt_mask)
    known: dict[tuple[int, bool], tuple[float, float]] = {}
    parts = []
    for ps, mask in zip(prompt_sets, pred_masks):
        key = (id(mask), ps.is_empty)
        if key not in known:
            known[key] = mask_quality(ps, mask, gt)
        parts.append(score(ps, mask, gt, weights, fmt, quality=known[key]))
    return parts
