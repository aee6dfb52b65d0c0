from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segr1.core.parser import PRERL_FORMAT, RL_FORMAT, ParserLimits, PromptSet, parse_completion
from segr1.core.prompts import answer_text

SIZE = (768, 512)  # (width, height): non-square so x and y cannot be swapped unnoticed


def parse(text: object, limits: ParserLimits | None = None) -> PromptSet:
    return parse_completion(text, SIZE, limits)


# --- realistic good outputs --------------------------------------------------------------------


def test_paper_format_single_box():
    ps = parse(
        "<think>The frog sits on the bark, its outline is near the centre.</think> "
        "<bbox>[120,80,410,350]</bbox>, <points>[[250,200],[300,260],[90,400]]</points>, <labels>[1,1,0]</labels>"
    )
    assert ps.errors == ()
    assert ps.think == "The frog sits on the bark, its outline is near the centre."
    np.testing.assert_array_equal(ps.boxes, [[120, 80, 410, 350]])
    np.testing.assert_array_equal(ps.points, [[250, 200], [300, 260], [90, 400]])
    np.testing.assert_array_equal(ps.labels, [1, 1, 0])
    assert ps.labels.dtype == np.int64
    assert ps.complete(RL_FORMAT) and not ps.is_empty


def test_spaces_newlines_decimals_and_several_boxes():
    ps = parse(
        "<think>\ntwo fish\n</think>\n<bbox>[ 10.5 , 20 ,\n 30.25, 40 ]</bbox>\n"
        "<bbox>[[50,60,70,80],[1,2,3,4]]</bbox>\n"
        "<points>[ [15 , 25] ,\n[55.5,65] ]</points>\n<labels>[ 1 ,\n 0 ]</labels>\n"
    )
    assert ps.errors == ()
    np.testing.assert_allclose(ps.boxes, [[10.5, 20, 30.25, 40], [50, 60, 70, 80], [1, 2, 3, 4]])
    np.testing.assert_allclose(ps.points, [[15, 25], [55.5, 65]])
    np.testing.assert_array_equal(ps.labels, [1, 0])
    assert ps.think == "two fish"


def test_corners_are_ordered_and_coordinates_clipped_to_the_image():
    ps = parse(
        "<think>t</think><bbox>[700,600,-5,30]</bbox><points>[[800,-3],[10.5,513]]</points><labels>[1,1]</labels>"
    )
    np.testing.assert_array_equal(ps.boxes, [[0, 30, 700, 512]])
    np.testing.assert_array_equal(ps.points, [[768, 0], [10.5, 512]])
    assert ps.errors == ()


def test_single_bare_point_and_empty_lists():
    ps = parse("<points>[3,4]</points><labels>[1]</labels>")
    np.testing.assert_array_equal(ps.points, [[3, 4]])
    assert ps.complete(PRERL_FORMAT) and not ps.complete(RL_FORMAT)
    box_only = parse("<think>x</think><bbox>[1,2,3,4]</bbox><points>[]</points><labels>[]</labels>")
    assert box_only.complete(RL_FORMAT) and box_only.points.shape == (0, 2)


def test_answer_tags_inside_think_are_drafts_not_answers():
    ps = parse(
        "<think>maybe <bbox>[1,1,5,5]</bbox>? no.</think>"
        "<bbox>[10,10,50,50]</bbox><points>[]</points><labels>[]</labels>"
    )
    np.testing.assert_array_equal(ps.boxes, [[10, 10, 50, 50]])


def test_prerl_format_has_no_box_or_think():
    ps = parse("<points>[[100,100],[5,5]]</points>, <labels>[1,0]</labels>")
    assert ps.complete(PRERL_FORMAT)
    assert not ps.has_think and not ps.has_boxes and ps.boxes.shape == (0, 4)


def test_exponent_and_signed_numbers():
    ps = parse("<bbox>[1e2,+2.5E1,3.,.5]</bbox>")
    np.testing.assert_allclose(ps.boxes, [[3, 0.5, 100, 25]])


# --- realistic bad outputs ---------------------------------------------------------------------

BAD_CASES = [
    ("<bbox>[1,2,3]</bbox>", "need 4 numbers, got 3", "has_boxes"),
    ("<bbox>[1,2,3,4,5]</bbox>", "need 4 numbers, got 5", "has_boxes"),
    ("<bbox>[x1,y1,x2,y2]</bbox>", "unexpected text", "has_boxes"),
    ("<bbox>[1,2,nan,4]</bbox>", "unexpected text", "has_boxes"),
    ("<bbox>[1,2,1e999,4]</bbox>", "non-finite", "has_boxes"),
    ("<bbox>[1,2,30000,4]</bbox>", "absurd magnitude", "has_boxes"),
    ("<bbox>(1,2,3,4)</bbox>", "unexpected text", "has_boxes"),
    ("<bbox>1,2,3,4</bbox>", "expected a bracketed list", "has_boxes"),
    ("<bbox>[1,2,3,4,]</bbox>", "trailing comma", "has_boxes"),
    ("<bbox>[1 2,3,4]</bbox>", "missing comma", "has_boxes"),
    ("<bbox>[1,2,3,4]]</bbox>", "text after the closing bracket", "has_boxes"),
    ("<points>[[1,2][3,4]]</points><labels>[1,1]</labels>", "missing comma before", "has_points"),
    ("<bbox>[[1,2,3,4]</bbox>", "unclosed", "has_boxes"),
    ("<bbox>[]</bbox>", "no box given", "has_boxes"),
    ("<bbox>__import__('os').system('x')</bbox>", "unexpected text", "has_boxes"),
    ("<points>[[1,2,3]]</points><labels>[1]</labels>", "need 2 numbers, got 3", "has_points"),
    ("<points>[[1,2]]</points><labels>[2]</labels>", "0 or 1", "has_labels"),
    ("<points>[[1,2]]</points><labels>[0.5]</labels>", "0 or 1", "has_labels"),
    ("<points>[[1,2]]</points><labels>[[1]]</labels>", "flat list", "has_labels"),
    ("<points>[[1,2],[3,4]]</points><labels>[1]</labels>", "2 points but 1 labels", "has_points"),
    ("<points>[[1,2]]</points>", "points without valid labels", "has_points"),
    ("<labels>[1]</labels>", "labels without valid points", "has_labels"),
    ("<points>[[1,2]]</points><points>[[3,4]]</points><labels>[1]</labels>", "appears 2 times", "has_points"),
    ("<points>[[[[1,2]]]]</points><labels>[1]</labels>", "nested deeper", "has_points"),
]


@pytest.mark.parametrize(("text", "reason", "flag"), BAD_CASES)
def test_bad_outputs_are_rejected_with_a_reason(text: str, reason: str, flag: str):
    ps = parse(text)
    assert not getattr(ps, flag)
    assert any(reason in error for error in ps.errors), ps.errors
    assert not ps.complete(RL_FORMAT) and not ps.complete(PRERL_FORMAT)


def test_limits_reject_too_many_boxes_and_points():
    limits = ParserLimits(max_boxes=2, max_points=3)
    boxes = "<bbox>[1,1,2,2]</bbox>" * 3
    ps = parse(boxes + "<points>[[1,1],[2,2],[3,3],[4,4]]</points><labels>[1,1,1,1]</labels>", limits)
    assert len(ps.boxes) == 0 and len(ps.points) == 0
    assert any("3 boxes, limit 2" in e for e in ps.errors)
    assert any("4 points, limit 3" in e for e in ps.errors)
    assert ps.is_empty


def test_empty_think_and_unclosed_think_do_not_count():
    assert not parse("<think>   </think><points>[]</points><labels>[]</labels>").has_think
    unclosed = parse("<think>I will answer <points>[[1,2]]</points><labels>[1]</labels>")
    assert not unclosed.has_think and unclosed.think is None
    np.testing.assert_array_equal(unclosed.points, [[1, 2]])


def test_non_string_and_huge_input():
    assert parse(None).is_empty and "not str" in parse(None).errors[0]
    assert parse(b"<points>").errors
    huge = "<think>" + "[" * 100_000 + "</think>" + "<bbox>" + "1," * 50_000
    start = time.perf_counter()
    ps = parse(huge)
    assert time.perf_counter() - start < 0.5
    assert any("truncated" in e for e in ps.errors)


def test_pathological_bodies_parse_in_linear_time():
    limits = ParserLimits(max_chars=200_000)
    for body in (" " * 100_000 + "x", "1" * 100_000, "[" * 50_000, "<bbox>" * 20_000):
        start = time.perf_counter()
        parse(f"<bbox>{body}</bbox>" + "<bbox>" * 1000, limits)
        assert time.perf_counter() - start < 0.5, body[:10]


# --- property tests ----------------------------------------------------------------------------

_pieces = st.sampled_from(
    ["<think>", "</think>", "<bbox>", "</bbox>", "<points>", "</points>", "<labels>", "</labels>"]
    + ["[", "]", ",", " ", "\n", "1", "-7", "0", "1e9", "nan", "inf", "3.5", ".", "e", "x", "[[", "]]"]
)
_tagged_text = st.lists(st.one_of(_pieces, st.text(max_size=5)), max_size=60).map("".join)


def _within_image(ps: PromptSet) -> bool:
    w, h = SIZE
    xs = np.concatenate([ps.boxes[:, [0, 2]].ravel(), ps.points[:, 0]])
    ys = np.concatenate([ps.boxes[:, [1, 3]].ravel(), ps.points[:, 1]])
    return bool((xs >= 0).all() and (xs <= w).all() and (ys >= 0).all() and (ys <= h).all())


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), _tagged_text))
def test_any_text_parses_without_raising_and_stays_in_bounds(text: str):
    limits = ParserLimits(max_boxes=3, max_points=4)
    ps = parse_completion(text, SIZE, limits)
    assert ps.boxes.shape[1:] == (4,) and ps.points.shape[1:] == (2,)
    assert len(ps.points) == len(ps.labels)
    assert len(ps.boxes) <= 3 and len(ps.points) <= 4
    assert np.isfinite(ps.boxes).all() and np.isfinite(ps.points).all()
    assert _within_image(ps)
    assert (ps.boxes[:, 0] <= ps.boxes[:, 2]).all() and (ps.boxes[:, 1] <= ps.boxes[:, 3]).all()
    assert set(ps.labels.tolist()) <= {0, 1}
    assert all(isinstance(e, str) for e in ps.errors)


_coord_x = st.integers(-50, 900)
_coord_y = st.integers(-50, 600)
_box = st.tuples(_coord_x, _coord_y, _coord_x, _coord_y)
_point = st.tuples(_coord_x, _coord_y)


@settings(max_examples=200, deadline=None)
@given(
    boxes=st.lists(_box, min_size=1, max_size=4),
    points=st.lists(st.tuples(_point, st.sampled_from([0, 1])), max_size=6),
    think=st.text(st.characters(blacklist_characters="<>"), min_size=1, max_size=40).filter(str.strip),
)
def test_canonical_answer_round_trips(boxes, points, think):
    text = answer_text(boxes, [p for p, _ in points], [lab for _, lab in points], think=think)
    ps = parse(text)
    assert ps.errors == ()
    assert ps.complete(RL_FORMAT)
    assert ps.think == think.strip()
    w, h = SIZE
    b = np.asarray(boxes, dtype=float).reshape(-1, 4)
    xs, ys = np.sort(b[:, [0, 2]], axis=1), np.sort(b[:, [1, 3]], axis=1)
    expected_boxes = np.clip(np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1), 0, [w, h, w, h])
    np.testing.assert_array_equal(ps.boxes, expected_boxes)
    expected_points = np.clip(np.asarray([p for p, _ in points], float).reshape(-1, 2), 0, [w, h])
    np.testing.assert_array_equal(ps.points, expected_points)
    np.testing.assert_array_equal(ps.labels, [lab for _, lab in points])


@settings(max_examples=100, deadline=None)
@given(
    points=st.lists(st.tuples(st.floats(0, 500), st.floats(0, 500)), min_size=1, max_size=5),
    decimals=st.integers(1, 3),
)
def test_decimal_answers_round_trip_to_their_rounding(points, decimals):
    labels = [1] * len(points)
    ps = parse(answer_text(None, points, labels, decimals=decimals))
    assert ps.complete(PRERL_FORMAT)
    np.testing.assert_allclose(ps.points, np.round(np.asarray(points), decimals), rtol=0, atol=1e-9)
