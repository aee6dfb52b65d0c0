"""Time our metrics against pysodmetrics on the same masks, in the same run.

    .venv/bin/python benchmarks/metrics.py [--size 768] [--repeats 20]

Prints milliseconds per mask (median over repeats) for the reward path (IoU + S-measure of a binary
mask) and for the full COD/SOD set (S-measure, E-measure, weighted F-measure, F-measure, MAE), on
binary masks (what SAM2 returns) and on float probability maps, with the ratio pysodmetrics / ours.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import py_sod_metrics as reference

from segr1.core import metrics


def _ellipse(size: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    rows, cols = np.ogrid[:size, :size]
    return ((cols - cx) / rx) ** 2 + ((rows - cy) / ry) ** 2 <= 1


def make_masks(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ground-truth blob, a binary prediction that is offset and ragged, and a soft map of it."""
    rng = np.random.default_rng(seed)
    gt = _ellipse(size, 0.45 * size, 0.5 * size, 0.22 * size, 0.3 * size)
    pred = _ellipse(size, 0.48 * size, 0.52 * size, 0.2 * size, 0.28 * size) ^ (rng.random((size, size)) < 0.01)
    soft = np.clip(pred * 0.85 + rng.normal(0, 0.1, (size, size)), 0, 1)
    return gt, pred, soft


def _ms_per_call(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm caches and lazy imports outside the timing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def ours_reward(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    return metrics.iou(pred, gt), metrics.smeasure(pred, gt)


def reference_reward(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    sm = reference.Smeasure()
    sm.step(pred.astype(np.float64), gt, normalize=False)
    iou = np.logical_and(pred, gt).sum() / np.logical_or(pred, gt).sum()
    return float(iou), float(sm.get_results()["sm"])


def ours_full(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    acc = metrics.SODMetrics()
    acc.update(pred, gt)
    return acc.results()


def reference_full(pred: np.ndarray, gt: np.ndarray) -> None:
    pred = pred.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = reference.Fmeasure()
    for metric in (reference.Smeasure(), reference.Emeasure(), reference.WeightedFmeasure(), reference.MAE(), fm):
        metric.step(pred, gt, normalize=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    gt, pred, soft = make_masks(args.size)

    ours_value, ref_value = ours_reward(pred, gt), reference_reward(pred, gt)
    assert np.allclose(ours_value, ref_value, atol=1e-6), (ours_value, ref_value)

    rows = [
        ("reward: IoU + S-measure, binary", lambda: ours_reward(pred, gt), lambda: reference_reward(pred, gt)),
        ("full SOD set, binary", lambda: ours_full(pred, gt), lambda: reference_full(pred, gt)),
        ("full SOD set, float map", lambda: ours_full(soft, gt), lambda: reference_full(soft, gt)),
    ]
    print(f"ms per {args.size}x{args.size} mask, median of {args.repeats}")
    print(f"{'metric':36s} {'ours':>9s} {'pysodmetrics':>13s} {'speed-up':>9s}")
    for name, ours_fn, ref_fn in rows:
        ours_ms, ref_ms = _ms_per_call(ours_fn, args.repeats), _ms_per_call(ref_fn, args.repeats)
        print(f"{name:36s} {ours_ms:9.2f} {ref_ms:13.2f} {ref_ms / ours_ms:8.1f}x")


if __name__ == "__main__":
    main()
