from __future__ import annotations

import warnings

import numpy as np
import py_sod_metrics as reference
import pytest

from segr1.core import metrics

TOL = 1e-6


def _reference(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """pysodmetrics on one image, with predictions already in [0, 1] (normalize=False)."""
    pred = pred.astype(np.float64)
    sm, em, wfm, mae = reference.Smeasure(), reference.Emeasure(), reference.WeightedFmeasure(), reference.MAE()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Fmeasure warns that it is deprecated in favour of FmeasureV2
        fm = reference.Fmeasure()
    for metric in (sm, em, wfm, mae, fm):
        metric.step(pred, gt, normalize=False)
    e, f = em.get_results()["em"], fm.get_results()["fm"]
    return {
        "Sm": sm.get_results()["sm"],
        "wFm": wfm.get_results()["wfm"],
        "MAE": mae.get_results()["mae"],
        "adpEm": e["adp"],
        "meanEm": e["curve"].mean(),
        "maxEm": e["curve"].max(),
        "adpFm": f["adp"],
        "meanFm": f["curve"].mean(),
        "maxFm": f["curve"].max(),
    }


def _ours(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    acc = metrics.SODMetrics()
    acc.update(pred, gt)
    return acc.results()


def _cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    h, w = 37, 53
    blob = np.zeros((h, w), bool)
    blob[8:25, 10:40] = True
    noisy = blob ^ (rng.random((h, w)) < 0.1)
    one_pixel = np.zeros((h, w), bool)
    one_pixel[17, 20] = True
    soft = np.clip(blob * 0.8 + rng.normal(0, 0.2, (h, w)), 0, 1)
    cases = [
        ("random float", rng.random((h, w)), rng.random((h, w)) < 0.3),
        ("random binary", rng.random((h, w)) < 0.4, rng.random((h, w)) < 0.3),
        ("noisy blob binary", noisy, blob),
        ("soft blob", soft, blob),
        ("empty gt float", rng.random((h, w)), np.zeros((h, w), bool)),
        ("empty gt binary", noisy, np.zeros((h, w), bool)),
        ("full gt", soft, np.ones((h, w), bool)),
        ("full gt binary", noisy, np.ones((h, w), bool)),
        ("empty pred", np.zeros((h, w), bool), blob),
        ("full pred", np.ones((h, w), bool), blob),
        ("all zero float pred", np.zeros((h, w)), blob),
        ("one-pixel gt", noisy, one_pixel),
        ("one-pixel gt and pred", one_pixel, one_pixel),
        ("one-pixel gt soft", soft, one_pixel),
        ("tall", rng.random((61, 9)) < 0.5, rng.random((61, 9)) < 0.5),
        ("wide float", rng.random((5, 70)), rng.random((5, 70)) < 0.5),
        ("1x1", np.ones((1, 1), bool), np.ones((1, 1), bool)),
        ("2x2", np.array([[1.0, 0.2], [0.0, 0.7]]), np.array([[True, False], [False, True]])),
    ]
    return cases


@pytest.mark.parametrize(("name", "pred", "gt"), _cases(), ids=[c[0] for c in _cases()])
def test_agrees_with_pysodmetrics(name: str, pred: np.ndarray, gt: np.ndarray):
    ref, ours = _reference(pred, gt), _ours(pred, gt)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(float(value), abs=TOL), key


def test_several_images_average_like_pysodmetrics():
    cases = _cases()[:4]
    acc = metrics.SODMetrics()
    sm, em = reference.Smeasure(), reference.Emeasure()
    for _, pred, gt in cases:
        acc.update(pred, gt)
        sm.step(pred.astype(float), gt, normalize=False)
        em.step(pred.astype(float), gt, normalize=False)
    out = acc.results()
    assert len(acc) == 4
    assert out["Sm"] == pytest.approx(sm.get_results()["sm"], abs=TOL)
    assert out["maxEm"] == pytest.approx(em.get_results()["em"]["curve"].max(), abs=TOL)
    assert out["meanEm"] == pytest.approx(em.get_results()["em"]["curve"].mean(), abs=TOL)


def test_centroid_on_the_last_column_gives_a_number_where_pysodmetrics_gives_nan():
    gt = np.zeros((5, 7), bool)
    gt[2, 6] = True
    pred = gt.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference.Smeasure()
        ref.step(pred.astype(float), gt, normalize=False)
    assert np.isnan(ref.get_results()["sm"])
    # A perfect prediction: object score 1 - tiny eps terms; both non-empty regions agree exactly.
    assert metrics.smeasure(pred, gt) == pytest.approx(1.0, abs=1e-12)
    assert metrics.smeasure(pred.astype(float), gt) == pytest.approx(1.0, abs=1e-12)


def test_iou_by_hand_and_float_maps_binarised_at_half():
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True  # 4 pixels
    pred = np.zeros((4, 4), bool)
    pred[1:3, 1:3] = True  # 4 pixels, 1 shared
    assert metrics.intersection_union(pred, gt) == (1, 7)
    assert metrics.iou(pred, gt) == pytest.approx(1 / 7)
    assert metrics.iou(pred * 0.6, gt) == pytest.approx(1 / 7)
    assert metrics.iou(pred * 0.4, gt) == 0.0
    assert metrics.iou(np.zeros((3, 3), bool), np.zeros((3, 3), np.uint8)) == 1.0
    assert metrics.mae(pred, gt) == pytest.approx(6 / 16)


def test_smeasure_by_hand_for_trivial_ground_truths():
    pred = np.array([[0.0, 0.5], [1.0, 0.5]])
    assert metrics.smeasure(pred, np.zeros((2, 2), bool)) == pytest.approx(1 - 0.5)
    assert metrics.smeasure(pred, np.ones((2, 2), bool)) == pytest.approx(0.5)


def test_giou_and_ciou_accumulate_over_every_expression():
    acc = metrics.IoUAccumulator()
    gt_a = np.zeros((10, 10), bool)
    gt_a[:5] = True  # 50 pixels
    assert acc.update(gt_a, gt_a) == 1.0
    gt_b = np.zeros((10, 10), bool)
    gt_b[0, :4] = True  # 4 pixels; prediction misses all of them and adds 4 more
    pred_b = np.zeros((10, 10), bool)
    pred_b[9, :4] = True
    assert acc.update(pred_b, gt_b) == 0.0
    out = acc.results()
    assert out["gIoU"] == pytest.approx(0.5)
    assert out["cIoU"] == pytest.approx(50 / (50 + 8))
    assert out["count"] == 2


def test_bad_inputs_are_refused_with_the_reason():
    gt = np.zeros((4, 4), np.uint8)
    gt[0, 0] = 255
    with pytest.raises(ValueError, match="ground truth must be binary"):
        metrics.iou(np.zeros((4, 4), bool), gt)
    with pytest.raises(ValueError, match=r"prediction shape \(4, 5\) differs"):
        metrics.smeasure(np.zeros((4, 5)), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.mae(np.full((2, 2), np.nan), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="integer prediction must be 0/1"):
        metrics.mae(np.full((2, 2), 255, np.uint8), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="no masks were added"):
        metrics.SODMetrics().results()
    with pytest.raises(ValueError, match="no masks were added"):
        metrics.IoUAccumulator().results()
