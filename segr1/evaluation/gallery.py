"""An HTML gallery of the best and worst predictions of each benchmark, ranked by IoU.

Each case is one picture of three panels (`segr1.core.draw.panel`, the same picture the training job
dumps): the image, the ground truth in green, and the prediction in red with the policy's boxes
and points drawn on it. The page is one self-contained HTML file that refers to the pictures by
relative paths, so the folder can be copied or served as is. Text from the model and the dataset is
HTML-escaped.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from segr1.core.draw import panel
from segr1.core.files import write_atomic
from segr1.evaluation.datasets import Benchmark, Example, Sample
from segr1.evaluation.results import EvalResult, ResultStore

GALLERY_DIR = "gallery"
INDEX = "index.html"
COMPLETION_CHARS = 400


@dataclass(frozen=True)
class Case:
    rank: str  # "best" or "worst"
    result: EvalResult
    picture: str  # path relative to the gallery folder


def pick_cases(results: Sequence[EvalResult], count: int) -> tuple[list[EvalResult], list[EvalResult]]:
    """The ``count`` highest-IoU and ``count`` lowest-IoU results (ties by id); a result is in one
    list only, so a small benchmark is not shown twice."""
    ranked = sorted(results, key=lambda r: (-r.iou, r.id))
    best = ranked[:count]
    best_ids = {r.id for r in best}
    worst = [r for r in reversed(ranked) if r.id not in best_ids][:count]
    return best, worst


def _thumbnail(sample: Sample, pred: np.ndarray, result: EvalResult, height: int) -> Image.Image:
    """The three-panel picture, scaled so each panel is ``height`` pixels tall."""
    h, w = sample.gt.shape
    width = max(1, round(w * height / h))
    image = np.asarray(Image.fromarray(sample.image).resize((width, height), Image.Resampling.BILINEAR))

    def small(mask: np.ndarray) -> np.ndarray:
        img = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
        return np.asarray(img.resize((width, height), Image.Resampling.NEAREST)) >= 128

    return panel(
        image,
        small(sample.gt),
        small(pred),
        np.asarray(result.boxes, dtype=float).reshape(-1, 4),
        np.asarray(result.points, dtype=float).reshape(-1, 2),
        np.asarray(result.labels, dtype=int),
        (int(result.policy_size[0]), int(result.policy_size[1])),
    )


def _examples_by_id(benchmark: Benchmark, wanted: set[str]) -> dict[str, Example]:
    found: dict[str, Example] = {}
    for example in benchmark.examples():
        if example.id in wanted:
            found[example.id] = example
            if len(found) == len(wanted):
                break
    return found


def benchmark_cases(
    benchmark: Benchmark, store: ResultStore, gallery_dir: Path, count: int, height: int, ids: set[str] | None = None
) -> list[Case]:
    """Draw the best and worst ``count`` results of a benchmark (among ``ids`` when given)."""
    results = [r for r in store.done.values() if ids is None or r.id in ids]
    best, worst = pick_cases(results, count)
    chosen = [("best", r) for r in best] + [("worst", r) for r in worst]
    examples = _examples_by_id(benchmark, {r.id for _, r in chosen})
    folder = gallery_dir / benchmark.key
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for rank, result in chosen:
        picture = _thumbnail(examples[result.id].load(), store.mask(result), result, height)
        name = Path(result.mask).with_suffix(".jpg").name
        jpeg = io.BytesIO()
        picture.save(jpeg, format="JPEG", quality=90)
        write_atomic(folder / name, jpeg.getvalue())
        cases.append(Case(rank, result, f"{benchmark.key}/{name}"))
    return cases


def _case_html(case: Case) -> str:
    r = case.result
    completion = r.completion if len(r.completion) <= COMPLETION_CHARS else r.completion[:COMPLETION_CHARS] + "..."
    status = "no prompt (empty mask)" if r.empty else ("ok" if r.format_ok else "format error")
    expression = f"<div class=expr>{html.escape(r.expression)}</div>" if r.expression else ""
    return (
        "<div class=case>"
        f"<img src=\"{html.escape(case.picture, quote=True)}\" alt=\"{html.escape(r.id, quote=True)}\">"
        f"<div class=meta><b>{html.escape(r.id)}</b> IoU {r.iou:.3f} | {status}</div>{expression}"
        f"<pre>{html.escape(completion)}</pre></div>"
    )


_STYLE = (
    "body{font-family:sans-serif;margin:1em}.case{display:inline-block;vertical-align:top;margin:6px;"
    "max-width:640px}.case img{display:block;max-width:100%}.meta{font-size:13px}.expr{font-size:13px;"
    "font-style:italic}pre{white-space:pre-wrap;font-size:11px;background:#f4f4f4;margin:2px 0;"
    "max-height:8em;overflow:auto}"
)


def gallery_html(sections: Sequence[tuple[str, list[Case]]]) -> str:
    parts = [
        "<!DOCTYPE html><html><head><meta charset=utf-8><title>segr1 evaluation gallery</title>",
        f"<style>{_STYLE}</style></head><body><h1>segr1 evaluation gallery</h1>",
        "<p>Panels: image | ground truth (green) | prediction (red) with the policy's boxes (yellow), "
        "positive points (cyan) and negative points (magenta).</p>",
    ]
    for title, cases in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        for rank in ("best", "worst"):
            chosen = [c for c in cases if c.rank == rank]
            if chosen:
                parts.append(f"<h3>{rank} {len(chosen)} by IoU</h3>")
                parts += [_case_html(c) for c in chosen]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_gallery(
    out_dir: Path,
    benchmarks: Sequence[tuple[Benchmark, ResultStore, set[str] | None]],
    count: int = 8,
    height: int = 192,
) -> Path:
    """Pictures and ``gallery/index.html`` under ``out_dir``; returns the page's path."""
    gallery_dir = out_dir / GALLERY_DIR
    gallery_dir.mkdir(parents=True, exist_ok=True)
    sections = [
        (benchmark.title, benchmark_cases(benchmark, store, gallery_dir, count, height, ids))
        for benchmark, store, ids in benchmarks
    ]
    path = gallery_dir / INDEX
    write_atomic(path, gallery_html(sections))
    return path
