"""The results table, as Markdown for people and JSON for tools, with the paper's numbers beside ours.

Metrics are kept as fractions in JSON; the Markdown shows COD/SOD metrics as fractions (as those
papers do) and IoU metrics in percent (as the referring and reasoning papers do). The paper's
numbers (Seg-R1, its tables for COD10K, RefCOCO/+/g and ReasonSeg) are stored here in the same
units as ours, so JSON consumers can compare directly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from segr1.core.files import write_atomic
from segr1.evaluation.datasets import FOREGROUND_TASKS
from segr1.evaluation.scoring import BenchmarkScore

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"

# Seg-R1's reported numbers, by benchmark key and metric, as fractions.
PAPER: dict[str, dict[str, float]] = {
    "cod10k-test": {"Sm": 0.873},
    "refcoco-val": {"cIoU": 0.743},
    "refcoco-testA": {"cIoU": 0.787},
    "refcoco-testB": {"cIoU": 0.676},
    "refcoco+-val": {"cIoU": 0.626},
    "refcoco+-testA": {"cIoU": 0.709},
    "refcoco+-testB": {"cIoU": 0.579},
    "refcocog-val": {"cIoU": 0.710},
    "refcocog-test": {"cIoU": 0.714},
    "reasonseg-val": {"gIoU": 0.608},
    "reasonseg-test": {"gIoU": 0.567},
}

_FOREGROUND_COLUMNS = ("Sm", "meanEm", "maxEm", "wFm", "MAE", "maxFm", "meanFm")
_SECTIONS = (
    ("Camouflaged and salient object detection", FOREGROUND_TASKS, _FOREGROUND_COLUMNS, 3, 1.0),
    ("Referring segmentation (%)", ("refer",), ("cIoU", "gIoU"), 1, 100.0),
    ("Reasoning segmentation (%)", ("reason",), ("gIoU", "cIoU"), 1, 100.0),
)


def paper_numbers(key: str) -> dict[str, float]:
    return dict(PAPER.get(key, {}))


def results_json(scores: Sequence[BenchmarkScore], settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "settings": settings,
        "benchmarks": [{**asdict(s), "paper": paper_numbers(s.key)} for s in scores],
    }


def _cell(value: float | None, digits: int, scale: float) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _section(title: str, scores: list[BenchmarkScore], columns: Sequence[str], digits: int, scale: float) -> list[str]:
    """One table: ours, then (paper) beside every metric the paper reports for some row here."""
    reported = [c for c in columns if any(c in paper_numbers(s.key) for s in scores)]
    header = ["Benchmark", "N"]
    for column in columns:
        header.append(column)
        if column in reported:
            header.append(f"{column} (paper)")
    header += ["empty masks", "format errors"]
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in scores:
        paper = paper_numbers(s.key)
        row = [s.title, str(s.count)]
        for column in columns:
            row.append(_cell(s.metrics.get(column), digits, scale))
            if column in reported:
                row.append(_cell(paper.get(column), digits, scale))
        row += [str(s.empty), str(s.format_errors)]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def results_markdown(scores: Sequence[BenchmarkScore], settings: dict[str, Any]) -> str:
    lines = ["# segr1 evaluation", ""]
    lines += [f"- {name}: `{value}`" for name, value in settings.items()]
    lines.append("")
    for title, tasks, columns, digits, scale in _SECTIONS:
        chosen = [s for s in scores if s.task in tasks]
        if chosen:
            lines += _section(title, chosen, columns, digits, scale)
    lines += [
        "*empty masks*: completions with no usable prompt; their prediction is an empty mask and "
        "counts as such in every metric. *format errors*: answers missing a required part or with "
        "a part rejected by the parser (empty masks included).",
        "",
    ]
    notes = [f"- {s.title}: {note}" for s in scores for note in s.notes]
    if notes:
        lines += ["Notes:", "", *notes, ""]
    return "\n".join(lines)


def write_report(out_dir: Path, scores: Sequence[BenchmarkScore], settings: dict[str, Any]) -> tuple[Path, Path]:
    """results.json and results.md in ``out_dir``, each written to a temp name and renamed."""
    json_path, md_path = out_dir / RESULTS_JSON, out_dir / RESULTS_MD
    write_atomic(json_path, json.dumps(results_json(scores, settings), indent=2) + "\n")
    write_atomic(md_path, results_markdown(scores, settings))
    return json_path, md_path
