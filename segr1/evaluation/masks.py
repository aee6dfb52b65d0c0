"""Ground-truth masks from annotation geometry: polygons and COCO run-length encodings.

pycocotools is not a dependency, so COCO's two RLE forms are decoded here (uncompressed: a list of
run lengths; compressed: COCO's ASCII string of 5-bit groups) and polygons are rasterised with
Pillow. Runs are column-major, as COCO stores them. Pillow fills a polygon's interior and its
outline; pycocotools' own polygon rasteriser can differ from it on boundary pixels, so a RefCOCO
ground truth made here may differ from the official one by a pixel along the outline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


class AnnotationError(ValueError):
    """An annotation whose geometry cannot be turned into a mask; the caller adds the file name."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def draw_polygon(canvas: ImageDraw.ImageDraw, xy: Sequence[tuple[float, float]], value: int) -> None:
    """Fill a polygon and its outline on ``canvas``; fewer than three points draw a line or a dot,
    as OpenCV's fillPoly plus polylines do in LISA's ReasonSeg tools."""
    if len(xy) >= 3:
        canvas.polygon(list(xy), fill=value, outline=value)
    elif len(xy) == 2:
        canvas.line(list(xy), fill=value, width=1)
    elif len(xy) == 1:
        canvas.point(list(xy), fill=value)


def _check_polygons(polygons: Any) -> None:
    if not isinstance(polygons, list) or not polygons:
        raise AnnotationError("segmentation must be polygons (a non-empty list) or an RLE (a dict)")
    for index, flat in enumerate(polygons):
        if not isinstance(flat, list) or len(flat) < 6 or len(flat) % 2 or not all(map(_number, flat)):
            raise AnnotationError(
                f"polygon {index} must be a list of at least 3 (x, y) number pairs, got {str(flat)[:80]}"
            )


def coco_polygons_to_mask(polygons: Any, height: int, width: int) -> np.ndarray:
    """COCO polygon segmentation ``[[x1, y1, x2, y2, ...], ...]`` -> bool (height, width); the
    union of all parts."""
    _check_polygons(polygons)
    image = Image.new("L", (width, height), 0)
    canvas = ImageDraw.Draw(image)
    for flat in polygons:
        draw_polygon(canvas, list(zip(flat[0::2], flat[1::2])), 1)
    return np.asarray(image, dtype=np.uint8).astype(bool)


def rle_counts_from_string(text: str) -> list[int]:
    """COCO's compressed RLE string -> run lengths.

    Each count is written in 5-bit groups, least significant first, as characters offset by 48;
    bit 0x20 of a group says another group follows, and bit 0x10 of the last group is the sign.
    From the third count on, the value stored is the difference to the count two places before.
    """
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise AnnotationError("compressed RLE string ends inside a number")
            group = ord(text[position]) - 48
            if not 0 <= group < 64:
                raise AnnotationError(f"compressed RLE has a character outside COCO's alphabet: {text[position]!r}")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value -= 1 << shift  # sign-extend
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_counts_to_mask(counts: Sequence[int], height: int, width: int) -> np.ndarray:
    """Alternating background/foreground run lengths (background first), column-major."""
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, np.asarray(counts, dtype=np.int64))
    return flat.reshape((width, height)).T.copy()


def coco_rle_to_mask(rle: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """A COCO RLE ``{"size": [h, w], "counts": list | str}`` -> bool (height, width)."""
    return rle_counts_to_mask(_rle_counts(rle, height, width), height, width)


def _rle_counts(rle: Mapping[str, Any], height: int, width: int) -> list[int]:
    size = rle.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise AnnotationError(f"RLE 'size' must be [height, width], got {size!r}")
    if tuple(size) != (height, width):
        raise AnnotationError(f"RLE size {size} differs from the image's {height}x{width}")
    counts = rle.get("counts")
    if isinstance(counts, str):
        counts = rle_counts_from_string(counts)
    elif not isinstance(counts, list):
        raise AnnotationError(f"RLE 'counts' must be a list or a string, got {type(counts).__name__}")
    if any(not isinstance(c, int) or c < 0 for c in counts):
        raise AnnotationError("RLE counts must be non-negative integers")
    if sum(counts) != height * width:
        raise AnnotationError(
            f"RLE counts sum to {sum(counts)}, but the mask has {height}x{width}={height * width} pixels"
        )
    return counts


def coco_segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Either COCO segmentation form (polygons or RLE) -> bool (height, width)."""
    if isinstance(segmentation, Mapping):
        return coco_rle_to_mask(segmentation, height, width)
    return coco_polygons_to_mask(segmentation, height, width)


def check_coco_segmentation(segmentation: Any, height: int, width: int) -> None:
    """Structural check without rasterising, run while loading so that a bad annotation stops the
    run before any work; RLE run lengths are decoded and summed because a bad count would
    otherwise surface only mid-run."""
    if isinstance(segmentation, Mapping):
        _rle_counts(segmentation, height, width)
    else:
        _check_polygons(segmentation)
