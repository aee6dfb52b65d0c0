"""From an example and a prediction to a stored result, and from stored results to the metrics.

This is the evaluation without Ray: a *predictor* turns examples into predictions (the Ray runner
is one; ``local_predictor`` runs any completion function and segmenter in this process), every
prediction is stored as it arrives (`ResultStore`), and ``score_benchmark`` recomputes the metrics
from the saved PNG masks and the ground truth, so the numbers never depend on what a crashed or
resumed run held in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np

from segr1.core.files import mask_file_name
from segr1.core.frames import PixelBounds, policy_image
from segr1.core.metrics import IoUAccumulator, SODMetrics, intersection_union
from segr1.core.parser import ParserLimits, PromptSet, parse_completion
from segr1.core.prompts import answer_format
from segr1.core.segment import Segmenter, segment_image
from segr1.evaluation.datasets import FOREGROUND_TASKS, Benchmark, Example, Sample
from segr1.evaluation.results import EvalError, EvalResult, ResultStore


@dataclass
class Prediction:
    """The policy's completion, its parsed prompts (policy pixels) and the resulting mask (bool,
    the image's original size)."""

    mask: np.ndarray
    completion: str
    prompt_set: PromptSet
    policy_size: tuple[int, int]
    extra: dict[str, Any] = field(default_factory=dict)


# (task, policy side length, examples still to do) -> (example, its pixels, prediction), any order.
Predictor = Callable[[str, int, Iterator[Example]], Iterator[tuple[Example, Sample, Prediction]]]


def apply_ignore(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Clear ignored pixels in both masks: they then count in neither intersection nor union,
    which is LISA's ignore_index=255 rule."""
    if ignore is None or not ignore.any():
        return pred, gt
    return pred & ~ignore, gt & ~ignore


def make_result(example: Example, sample: Sample, prediction: Prediction) -> EvalResult:
    """The stored record of one prediction; a mask of the wrong size is an error, never resized."""
    height, width = sample.gt.shape
    mask = np.asarray(prediction.mask, dtype=bool)
    if mask.shape != (height, width):
        raise EvalError(
            f"example {example.id!r}: predicted mask is {mask.shape[1]}x{mask.shape[0]}, "
            f"the ground truth {width}x{height}"
        )
    pred, gt = apply_ignore(mask, sample.gt, sample.ignore)
    inter, union = intersection_union(pred, gt)
    ps = prediction.prompt_set
    return EvalResult(
        id=example.id,
        mask=mask_file_name(example.id),
        expression=example.expression,
        completion=prediction.completion,
        empty=bool(ps.is_empty),
        format_ok=bool(ps.complete(answer_format(example.task))),
        parse_errors=list(ps.errors),
        boxes=np.asarray(ps.boxes, dtype=float).tolist(),
        points=np.asarray(ps.points, dtype=float).tolist(),
        labels=[int(v) for v in ps.labels],
        policy_size=list(prediction.policy_size),
        image_size=[width, height],
        intersection=inter,
        union=union,
        extra=dict(prediction.extra),
    )


def pending_examples(benchmark: Benchmark, store: ResultStore, limit: int | None = None) -> Iterator[Example]:
    """The benchmark's first ``limit`` examples that have no stored result yet."""
    return (e for e in islice(benchmark.examples(), limit) if e.id not in store.done)


def expected_count(benchmark: Benchmark, limit: int | None) -> int:
    return benchmark.count if limit is None else min(limit, benchmark.count)


def evaluate_benchmark(
    benchmark: Benchmark,
    store: ResultStore,
    predictor: Predictor,
    policy_size: int,
    limit: int | None = None,
    on_result: Callable[[EvalResult], None] | None = None,
) -> int:
    """Predict every unfinished example and store each result as it arrives; returns how many
    were done now."""
    done = 0
    todo = pending_examples(benchmark, store, limit)
    for example, sample, prediction in predictor(benchmark.task, policy_size, todo):
        result = make_result(example, sample, prediction)
        store.add(result, prediction.mask)
        done += 1
        if on_result is not None:
            on_result(result)
    return done


def local_predictor(
    complete: Callable[[Example, np.ndarray], str],
    segmenter: Segmenter,
    limits: ParserLimits | None = None,
    bounds: PixelBounds | None = None,
) -> Predictor:
    """A predictor in this process: ``complete(example, policy_image)`` writes the completion,
    which is parsed and decoded by ``segmenter`` exactly as the reward actors do (one prompt set,
    policy coordinates scaled to the original image).

    With ``bounds`` the answer is read in the frame a processor with those bounds resizes the
    square image to, as the Ray runner does; without, in the square image's own pixels (for
    completion functions that see no processor)."""

    def predict(task: str, size: int, examples: Iterator[Example]) -> Iterator[tuple[Example, Sample, Prediction]]:
        frame = (size, size) if bounds is None else bounds.frame((size, size))
        for example in examples:
            sample = example.load()
            text = complete(example, policy_image(sample.image, size))
            prompt_set = parse_completion(text, frame, limits)
            mask = segment_image(segmenter, sample.image, prompt_set, frame)
            yield example, sample, Prediction(mask, text, prompt_set, frame)

    return predict


@dataclass
class BenchmarkScore:
    """A benchmark's metrics and how many predictions were empty or badly formatted."""

    key: str
    title: str
    task: str
    count: int
    metrics: dict[str, float]
    empty: int  # no usable prompt: the prediction is an empty mask
    format_errors: int  # the answer lacks a required part or had a part rejected
    notes: list[str] = field(default_factory=list)


def score_benchmark(benchmark: Benchmark, store: ResultStore, limit: int | None = None) -> BenchmarkScore:
    """Metrics over the first ``limit`` examples, from the saved masks against the ground truth.
    Every example must have a result: a missing one is an error, not a silent skip."""
    foreground = benchmark.task in FOREGROUND_TASKS
    sod, ious = SODMetrics(), IoUAccumulator()
    empty = format_errors = count = 0
    for example in islice(benchmark.examples(), limit):
        result = store.done.get(example.id)
        if result is None:
            raise EvalError(f"{store.records_path}: no result for example {example.id!r}; run again to finish")
        sample = example.load()
        pred = store.mask(result)
        if pred.shape != sample.gt.shape:
            raise EvalError(
                f"{store.masks_dir / result.mask}: mask is {pred.shape[1]}x{pred.shape[0]}, the ground "
                f"truth of {example.id!r} is {sample.gt.shape[1]}x{sample.gt.shape[0]}"
            )
        pred, gt = apply_ignore(pred, sample.gt, sample.ignore)
        if foreground:
            sod.update(pred, gt)
        else:
            ious.update(pred, gt)
        count += 1
        empty += result.empty
        format_errors += not result.format_ok
    if count == 0:
        raise EvalError(f"{benchmark.title}: no examples to score")
    metrics = sod.results() if foreground else {k: v for k, v in ious.results().items() if k != "count"}
    return BenchmarkScore(
        benchmark.key, benchmark.title, benchmark.task, count, metrics, empty, format_errors, list(benchmark.notes)
    )
