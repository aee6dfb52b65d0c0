"""One evaluation job: results folders opened (and checked) first, predictions for whatever is not
done yet, then metrics from the saved masks, the results table and the gallery.

The predictor is made only when some example is still to do, so re-running a finished job just
rewrites the report, and a settings mismatch or bad folder fails before any actor starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

from segr1.config import EvalSettings
from segr1.core.frames import policy_side
from segr1.evaluation.datasets import Benchmark
from segr1.evaluation.gallery import write_gallery
from segr1.evaluation.report import write_report
from segr1.evaluation.results import EvalError, ResultStore
from segr1.evaluation.scoring import (
    BenchmarkScore,
    Predictor,
    evaluate_benchmark,
    expected_count,
    pending_examples,
    score_benchmark,
)


@dataclass
class JobOptions:
    """Where and how one ``segr1 eval`` runs: ``evaluation`` is the config's section as it is
    (policy size, limit, gallery); ``settings`` what the results depend on (a resume must match)."""

    out_dir: Path
    settings: dict[str, Any]
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    restart: bool = False
    progress: bool = True

    @property
    def limit(self) -> int | None:
        return self.evaluation.limit

    def size_for(self, task: str) -> int:
        return policy_side(task, self.evaluation.policy_size)


@dataclass
class JobOutcome:
    scores: list[BenchmarkScore]
    results_json: Path
    results_md: Path
    gallery: Path | None
    predicted: int  # examples predicted by this run (0 when everything was already done)


def open_stores(benchmarks: Sequence[Benchmark], options: JobOptions) -> list[ResultStore]:
    keys = [b.key for b in benchmarks]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise EvalError(f"benchmark(s) given twice: {', '.join(duplicates)}")
    return [
        ResultStore(
            options.out_dir / b.key,
            {**options.settings, "benchmark": b.key, "task": b.task, "policy_size": options.size_for(b.task)},
            restart=options.restart,
        )
        for b in benchmarks
    ]


def run_job(
    benchmarks: Sequence[Benchmark],
    options: JobOptions,
    make_predictor: Callable[[], AbstractContextManager[Predictor]],
) -> JobOutcome:
    """Evaluate, score, report. ``make_predictor`` is entered once, and only if there is work."""
    options.out_dir.mkdir(parents=True, exist_ok=True)
    stores = open_stores(benchmarks, options)
    todo = [(b, s) for b, s in zip(benchmarks, stores) if next(pending_examples(b, s, options.limit), None)]
    predicted = 0
    if todo:
        with make_predictor() as predictor:
            for benchmark, store in todo:
                predicted += _predict(benchmark, store, predictor, options)
    scores = [score_benchmark(b, s, options.limit) for b, s in zip(benchmarks, stores)]
    json_path, md_path = write_report(options.out_dir, scores, options.settings)
    gallery = None
    if options.evaluation.gallery > 0:
        chosen = [(b, s, _scored_ids(b, options.limit)) for b, s in zip(benchmarks, stores)]
        gallery = write_gallery(options.out_dir, chosen, count=options.evaluation.gallery)
    return JobOutcome(scores, json_path, md_path, gallery, predicted)


def _scored_ids(benchmark: Benchmark, limit: int | None) -> set[str] | None:
    return None if limit is None else {e.id for e in islice(benchmark.examples(), limit)}


def _predict(benchmark: Benchmark, store: ResultStore, predictor: Predictor, options: JobOptions) -> int:
    total = expected_count(benchmark, options.limit)
    already = min(len(store.done), total)  # for the bar only: counting exactly would load every example
    bar = tqdm(total=total, initial=already, desc=benchmark.key, unit="ex", disable=not options.progress)
    empty = 0

    def on_result(result: Any) -> None:
        nonlocal empty
        empty += result.empty
        bar.update(1)
        bar.set_postfix(empty=empty, refresh=False)

    try:
        size = options.size_for(benchmark.task)
        return evaluate_benchmark(benchmark, store, predictor, size, options.limit, on_result)
    finally:
        bar.close()
