from __future__ import annotations

import numpy as np
import pytest

from segr1.core.metrics import smeasure
from segr1.core.parser import PRERL_FORMAT, RL_FORMAT, parse_completion
from segr1.core.rewards import RewardWeights, score, score_group

GOOD = "<think>a square</think> <bbox>[2,2,6,6]</bbox>, <points>[[3,3]]</points>, <labels>[1]</labels>"


def _gt() -> np.ndarray:
    gt = np.zeros((8, 8), bool)
    gt[2:6, 2:6] = True  # 16 pixels
    return gt


def test_perfect_answer_scores_format_plus_full_segmentation():
    gt = _gt()
    parts = score(parse_completion(GOOD, (8, 8)), gt.copy(), gt)
    assert parts.format == 1.0 and parts.iou == 1.0
    assert parts.smeasure == pytest.approx(1.0, abs=1e-9)
    assert parts.total == pytest.approx(1.0 + 0.7 + 0.3, abs=1e-9)
    assert set(parts.as_dict()) == {"total", "format", "iou", "smeasure", "segmentation", "point_count"}


def test_partial_overlap_uses_iou_and_smeasure_against_the_true_mask():
    gt = _gt()
    pred = np.zeros((8, 8), bool)
    pred[2:6, 2:4] = True  # half of the square: IoU 8/16
    parts = score(parse_completion(GOOD, (8, 8)), pred, gt)
    sm = 0.6636805431955835  # pysodmetrics' S-measure for this pair
    assert smeasure(pred, gt) == pytest.approx(sm, abs=1e-12)
    assert parts.iou == pytest.approx(0.5)
    assert parts.smeasure == pytest.approx(sm, abs=1e-12)
    # Against an empty mask (the paper's bug) it would be 1 - 8/64 = 0.875.
    assert smeasure(pred, np.zeros_like(gt)) == pytest.approx(0.875)
    assert parts.segmentation == pytest.approx(0.7 * 0.5 + 0.3 * sm)
    assert parts.total == pytest.approx(1.0 + 0.7 * 0.5 + 0.3 * sm)


def test_ground_truth_scaled_to_255_is_refused_not_silently_binarised():
    gt = _gt().astype(np.uint8) * 255
    with pytest.raises(ValueError, match="ground truth must be binary"):
        score(parse_completion(GOOD, (8, 8)), gt > 0, gt)


def test_unparseable_output_scores_zero_even_on_an_empty_ground_truth():
    empty = np.zeros((8, 8), bool)
    parts = score(parse_completion("I think it is a cat.", (8, 8)), empty, empty)
    assert set(parts.as_dict().values()) == {0.0} and len(parts.as_dict()) == 6


def test_format_is_all_or_nothing_and_task_dependent():
    gt = _gt()
    no_think = parse_completion("<bbox>[2,2,6,6]</bbox><points>[[3,3]]</points><labels>[1]</labels>", (8, 8))
    assert score(no_think, gt, gt).format == 0.0
    assert score(no_think, gt, gt, fmt=PRERL_FORMAT).format == 1.0
    bad_labels = parse_completion(
        "<think>x</think><bbox>[2,2,6,6]</bbox><points>[[3,3]]</points><labels>[7]</labels>", (8, 8)
    )
    parts = score(bad_labels, gt, gt, fmt=RL_FORMAT)
    assert parts.format == 0.0 and parts.iou == 1.0  # the valid box still segments


def test_point_count_reward_and_custom_weights():
    gt = _gt()
    weights = RewardWeights(format=0.5, iou=1.0, smeasure=0.0, point_count=0.25, points_min=2, points_max=3)
    one_point = score(parse_completion(GOOD, (8, 8)), gt, gt, weights)
    assert one_point.point_count == 0.0 and one_point.total == pytest.approx(0.5 + 1.0)
    two = GOOD.replace("[[3,3]]", "[[3,3],[4,4]]").replace("[1]", "[1,1]")
    two_points = score(parse_completion(two, (8, 8)), gt, gt, weights)
    assert two_points.point_count == 1.0 and two_points.total == pytest.approx(0.5 + 1.0 + 0.25)


def test_score_group_and_bad_arguments():
    gt = _gt()
    sets = [parse_completion(GOOD, (8, 8)), parse_completion("", (8, 8))]
    totals = [p.total for p in score_group(sets, [gt, np.zeros_like(gt)], gt)]
    assert totals == pytest.approx([2.0, 0.0])
    with pytest.raises(ValueError, match="2 prompt sets but 1 masks"):
        score_group(sets, [gt], gt)
    with pytest.raises(ValueError, match="binary mask"):
        score(sets[0], gt * 0.9, gt)
    with pytest.raises(ValueError, match="RewardWeights.iou"):
        RewardWeights(iou=-1)
