"""ReasonSeg (LISA): images with a JSON file beside each, holding the queries and the polygons.

    ROOT/val/<name>.jpg   ROOT/val/<name>.json     (likewise ROOT/test; ROOT may be the split folder)
    {"text": ["What in this picture can be used to ...?", ...], "is_sentence": true,
     "shapes": [{"label": "target", "points": [[x, y], ...], "shape_type": "polygon"}, ...]}

The ground truth is built as LISA builds it: polygons are drawn largest first (so a smaller one
drawn later wins where they overlap), with integer-truncated vertices, filled and outlined; a
label containing "ignore" marks pixels that the metrics leave out, a label "flag" is skipped, any
other label is the target. LISA evaluates each image's first query; `texts="all"` evaluates every
query as its own example.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from segr1.data.records import DatasetError
from segr1.evaluation.datasets import Benchmark, Example, Sample, read_json, read_rgb
from segr1.evaluation.masks import draw_polygon

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IGNORE, TARGET = 255, 1


@dataclass(frozen=True)
class Shape:
    label: str
    points: tuple[tuple[int, int], ...]


def _truncated(points: list) -> tuple[tuple[int, int], ...]:
    # LISA passes the vertices through np.int32, which truncates towards zero.
    return tuple((int(x), int(y)) for x, y in points)


def parse_shapes(data: Any, path: Path) -> tuple[list[str], list[Shape]]:
    """The queries and the drawable shapes of one annotation file; anything malformed names it."""
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with 'text' and 'shapes'")
    texts = data.get("text")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise DatasetError(f"{path}: 'text' must be a non-empty list of non-empty strings")
    shapes_data = data.get("shapes")
    if not isinstance(shapes_data, list):
        raise DatasetError(f"{path}: 'shapes' must be a list")
    shapes = []
    for index, item in enumerate(shapes_data):
        label = item.get("label") if isinstance(item, dict) else None
        points = item.get("points") if isinstance(item, dict) else None
        if not isinstance(label, str):
            raise DatasetError(f"{path}: shape {index} has no string 'label'")
        if label.lower() == "flag":  # deprecated marker shapes, skipped by LISA
            continue
        valid = isinstance(points, list) and points and all(
            isinstance(p, list)
            and len(p) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in p)
            for p in points
        )
        if not valid:
            raise DatasetError(f"{path}: shape {index} ({label!r}) needs 'points' as a list of [x, y] numbers")
        shapes.append(Shape(label, _truncated(points)))
    return [t.strip() for t in texts], shapes


def rasterise_shapes(shapes: list[Shape], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(target, ignore) bool masks, drawn largest-area first as LISA does."""

    def draw(shape: Shape, value: int, image: Image.Image) -> None:
        draw_polygon(ImageDraw.Draw(image), list(shape.points), value)

    areas = []
    for shape in shapes:
        alone = Image.new("L", (width, height), 0)
        draw(shape, 1, alone)
        areas.append(int(np.count_nonzero(np.asarray(alone))))
    canvas = Image.new("L", (width, height), 0)
    for index in sorted(range(len(shapes)), key=lambda i: -areas[i]):
        shape = shapes[index]
        draw(shape, IGNORE if "ignore" in shape.label.lower() else TARGET, canvas)
    labels = np.asarray(canvas)
    return labels == TARGET, labels == IGNORE


@dataclass(frozen=True)
class ReasonSegImage:
    image: Path
    annotation: Path
    shapes: tuple[Shape, ...]

    def load(self) -> Sample:
        image = read_rgb(self.image)
        gt, ignore = rasterise_shapes(list(self.shapes), image.shape[0], image.shape[1])
        return Sample(image, gt, ignore)


def split_dir(root: Path, split: str) -> Path:
    if root.name.lower() == split.lower() and root.is_dir():
        return root
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f"{folder}: ReasonSeg {split} folder not found")
    return folder


def reasonseg_examples(folder: Path, texts: str) -> list[Example]:
    """One example per image (its first query) or per query; every image needs its JSON and
    every JSON its image."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    annotations = {p.stem: p for p in files if p.suffix.lower() == ".json"}
    images: dict[str, Path] = {}
    for path in files:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in images:
                raise DatasetError(f"{path}: two images named {path.stem!r} (also {images[path.stem]})")
            images[path.stem] = path
    if not annotations and not images:
        raise DatasetError(f"{folder}: no ReasonSeg images or JSON files")
    for stem, path in annotations.items():
        if stem not in images:
            raise DatasetError(f"{path}: no image {stem}.jpg beside it")
    examples = []
    for stem, image in images.items():
        if stem not in annotations:
            raise DatasetError(f"{image}: no annotation {stem}.json beside it")
        queries, shapes = parse_shapes(read_json(annotations[stem]), annotations[stem])
        source = ReasonSegImage(image, annotations[stem], tuple(shapes))
        if texts == "first":
            examples.append(Example(stem, "reason", queries[0], source))
        else:
            examples += [Example(f"{stem}#{k}", "reason", q, source) for k, q in enumerate(queries)]
    return examples


def reasonseg_benchmark(key: str, title: str, root: Path, split: str, spec: str, texts: str) -> Benchmark:
    examples = reasonseg_examples(split_dir(root, split), texts)
    notes = () if texts == "first" else ("every query of an image evaluated (LISA evaluates the first)",)
    return Benchmark(key, title, "reason", spec, len(examples), lambda: iter(examples), notes)
