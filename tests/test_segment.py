from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from segr1.core.parser import PromptSet, parse_completion
from segr1.core.segment import BoxSegmenter, MaskPrompt, masks_for_group, prompts_for


def _ps(boxes=(), points=(), labels=()) -> PromptSet:
    return PromptSet(
        boxes=np.asarray(boxes, dtype=float).reshape(-1, 4),
        points=np.asarray(points, dtype=float).reshape(-1, 2),
        labels=np.asarray(labels, dtype=np.int64).reshape(-1),
    )


class CountingSegmenter:
    """BoxSegmenter that records each decode call's prompts (to check the batching)."""

    def __init__(self, radius: float = 0.0):
        self.inner = BoxSegmenter(point_radius=radius)
        self.calls: list[list[MaskPrompt]] = []

    def embed(self, image: np.ndarray):
        return self.inner.embed(image)

    def decode(self, embedding, prompts: Sequence[MaskPrompt]) -> list[np.ndarray]:
        self.calls.append(list(prompts))
        return self.inner.decode(embedding, prompts)


def test_each_box_takes_the_points_inside_it_and_scales_to_the_segmenter_image():
    ps = _ps(
        boxes=[[0, 0, 10, 10], [20, 20, 40, 30]],
        points=[[5, 5], [10, 10], [30, 25], [50, 50]],
        labels=[1, 0, 1, 1],
    )
    prompts = prompts_for(ps, policy_size=(100, 50), image_size=(200, 25))
    assert len(prompts) == 2
    np.testing.assert_allclose(prompts[0].box, [0, 0, 20, 5])
    np.testing.assert_allclose(prompts[0].points, [[10, 2.5], [20, 5]])  # the edge point (10, 10) belongs
    np.testing.assert_array_equal(prompts[0].labels, [1, 0])
    np.testing.assert_allclose(prompts[1].box, [40, 10, 80, 15])
    np.testing.assert_allclose(prompts[1].points, [[60, 12.5]])
    # (50, 50) lies in no box and is dropped
    assert sum(len(p.points) for p in prompts) == 3


def test_points_alone_without_a_box_and_nothing_for_an_empty_set():
    prompts = prompts_for(_ps(points=[[1, 2], [3, 4]], labels=[1, 0]), (10, 10), (10, 10))
    assert len(prompts) == 1 and prompts[0].box is None
    np.testing.assert_array_equal(prompts[0].labels, [1, 0])
    assert prompts_for(_ps(), (10, 10), (10, 10)) == []


def test_box_segmenter_fills_boxes_and_draws_positive_discs_only():
    seg = BoxSegmenter(point_radius=1.0)
    emb = seg.embed(np.zeros((6, 8, 3), dtype=np.uint8))
    (box_mask, point_mask) = seg.decode(
        emb,
        [
            MaskPrompt(np.array([1.0, 2.0, 3.5, 4.0]), np.zeros((0, 2)), np.zeros(0, np.int64)),
            MaskPrompt(None, np.array([[4.0, 3.0], [0.0, 0.0]]), np.array([1, 0])),
        ],
    )
    expected_box = np.zeros((6, 8), bool)
    expected_box[2:4, 1:4] = True  # columns floor(1)=1 .. ceil(3.5)=4, rows 2 .. 4
    np.testing.assert_array_equal(box_mask, expected_box)
    expected_disc = np.zeros((6, 8), bool)
    expected_disc[3, 3:6] = True
    expected_disc[2:5, 4] = True  # a radius-1 disc is a plus sign; the negative point draws nothing
    np.testing.assert_array_equal(point_mask, expected_disc)


def test_a_group_is_decoded_in_one_call_and_ors_each_candidates_boxes():
    seg = CountingSegmenter()
    emb = seg.embed(np.zeros((20, 20, 3), np.uint8))
    group = [
        parse_completion(
            "<think>a</think><bbox>[0,0,4,4]</bbox><bbox>[10,10,20,20]</bbox><points>[]</points><labels>[]</labels>",
            (40, 40),
        ),
        parse_completion("garbage", (40, 40)),
        parse_completion("<points>[[2,2]]</points><labels>[1]</labels>", (40, 40)),
    ]
    masks = masks_for_group(seg, emb, group, policy_size=(40, 40), image_size=(20, 20))
    assert len(seg.calls) == 1 and len(seg.calls[0]) == 3
    assert [m.shape for m in masks] == [(20, 20)] * 3
    expected = np.zeros((20, 20), bool)
    expected[0:2, 0:2] = True
    expected[5:10, 5:10] = True
    np.testing.assert_array_equal(masks[0], expected)
    assert not masks[1].any()
    assert masks[2].sum() == 1 and masks[2][1, 1]


def test_an_all_empty_group_calls_no_decode():
    seg = CountingSegmenter()
    masks = masks_for_group(seg, seg.embed(np.zeros((4, 5, 3), np.uint8)), [_ps(), _ps()], (5, 4), (5, 4))
    assert seg.calls == [] and all(m.shape == (4, 5) and not m.any() for m in masks)


def test_a_segmenter_returning_the_wrong_size_is_reported():
    class WrongSize(CountingSegmenter):
        def decode(self, embedding, prompts):
            return [np.zeros((3, 3), bool) for _ in prompts]

    seg = WrongSize()
    embedding = seg.embed(np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(ValueError, match=r"WrongSize.decode returned a \(3, 3\) mask, expected \(4, 5\)"):
        masks_for_group(seg, embedding, [_ps(points=[[1, 1]], labels=[1])], (5, 4), (5, 4))
    with pytest.raises(ValueError, match="policy_size"):
        prompts_for(_ps(), (0, 4), (5, 4))


def test_answers_with_the_same_prompts_are_decoded_once_and_scored_alike():
    """A low-entropy group: 6 of 8 answers give the same box and points (with other reasoning
    text, one without its think): one decode for them, and every reward as scoring each alone."""
    from segr1.core.parser import ParserLimits
    from segr1.core.rewards import score, score_group

    frame, limits = (40, 40), ParserLimits()
    same = "<bbox>[4,4,30,30]</bbox><points>[[10,10],[20,20]]</points><labels>[1,0]</labels>"
    texts = [f"<think>reason {i}</think>{same}" for i in range(5)] + [same]
    texts += ["<think>x</think><bbox>[0,0,10,10]</bbox><points>[[2,2]]</points><labels>[1]</labels>", "garbage"]
    group = [parse_completion(text, frame, limits) for text in texts]
    seg = CountingSegmenter()
    emb = seg.embed(np.zeros((40, 40, 3), np.uint8))
    masks = masks_for_group(seg, emb, group, frame, (40, 40))
    assert len(seg.calls) == 1 and len(seg.calls[0]) == 2  # the shared box and the other one
    gt = np.zeros((40, 40), bool)
    gt[5:25, 5:25] = True
    parts = score_group(group, masks, gt)
    alone = [score(ps, masks_for_group(BoxSegmenter(0.0), emb, [ps], frame, (40, 40))[0], gt) for ps in group]
    assert parts == alone
    assert parts[0].total == parts[4].total > parts[5].total  # the same mask; no think: no format reward
    assert parts[5].iou == parts[0].iou > 0 and parts[7].total == 0.0
