"""Evaluation of a policy with SAM2 on the paper's benchmarks (COD/SOD, RefCOCO/+/g, ReasonSeg).

``datasets`` (with ``refcoco`` and ``reasonseg``) turns `--benchmark` specs into checked benchmarks;
``scoring`` turns predictions into stored results and recomputes metrics from the saved masks;
``results`` is the resumable on-disk store; ``report`` and ``gallery`` write the outputs; ``job``
ties them together; ``runner`` is the Ray predictor (vLLM rollout + SAM2 reward actors). Only
``runner`` imports Ray.
"""

from __future__ import annotations

from segr1.evaluation.datasets import (
    Benchmark,
    Example,
    LoadOptions,
    Sample,
    parse_benchmark,
)
from segr1.evaluation.job import JobOptions, JobOutcome, run_job
from segr1.evaluation.report import PAPER, results_markdown, write_report
from segr1.evaluation.results import EvalError, EvalResult, ResultStore
from segr1.evaluation.scoring import (
    BenchmarkScore,
    Prediction,
    Predictor,
    evaluate_benchmark,
    local_predictor,
    score_benchmark,
)

__all__ = [
    "PAPER",
    "Benchmark",
    "BenchmarkScore",
    "EvalError",
    "EvalResult",
    "Example",
    "JobOptions",
    "JobOutcome",
    "LoadOptions",
    "Prediction",
    "Predictor",
    "ResultStore",
    "Sample",
    "evaluate_benchmark",
    "local_predictor",
    "parse_benchmark",
    "results_markdown",
    "run_job",
    "score_benchmark",
    "write_report",
]
