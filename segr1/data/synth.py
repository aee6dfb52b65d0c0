"""`segr1 data synth`: a synthetic camouflaged-object dataset with exact masks.

Each scene is a textured background (smoothed multi-octave noise or warped stripes in two related
colours) with one object, an ellipse, a smooth blob or a polygon, filled with the same kind of
texture at a slightly different scale and a slightly shifted colour: hard to see, but separable.
The object is pasted without blending, so the mask is exactly the set of pixels that came from the
object layer. Record i depends only on (seed, i), so a larger dataset extends a smaller one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from segr1.data.records import Record
from segr1.data.shards import DEFAULT_ROWS_PER_SHARD, ShardWriter

MIN_SIZE = 16
OBJECT_FRACTION = (0.05, 0.40)  # guaranteed range of mask area / image area
_TARGET_FRACTION = (0.07, 0.35)  # sampled target, inside the guarantee to absorb rasterisation


@dataclass(frozen=True)
class Scene:
    """A synthetic image, its exact object mask and the background the object was pasted on."""

    image: np.ndarray  # uint8 HxWx3
    mask: np.ndarray  # bool HxW
    background: np.ndarray  # uint8 HxWx3; equals image wherever mask is False


def _as_size(size: int | tuple[int, int]) -> tuple[int, int]:
    width, height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(width, height) < MIN_SIZE:
        raise ValueError(f"synthetic images must be at least {MIN_SIZE}x{MIN_SIZE}, got {width}x{height}")
    return width, height


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cell: float) -> np.ndarray:
    """Value noise in [0, 1]: three octaves of random grids upsampled bicubically."""
    total = np.zeros((height, width), np.float32)
    amplitude = 1.0
    for _ in range(3):
        gw = max(2, int(np.ceil(width / cell)) + 1)
        gh = max(2, int(np.ceil(height / cell)) + 1)
        grid = Image.fromarray(rng.random((gh, gw), dtype=np.float32), mode="F")
        total += amplitude * np.asarray(grid.resize((width, height), Image.Resampling.BICUBIC))
        amplitude *= 0.5
        cell = max(1.0, cell / 2)
    lo, hi = float(total.min()), float(total.max())
    return (total - lo) / max(hi - lo, 1e-6)


def _stripes(
    rng: np.random.Generator, width: int, height: int, period: float, angle: float
) -> np.ndarray:
    """Stripes at `angle`, warped by noise so they look organic, in [0, 1]."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    warp = _smooth_noise(rng, width, height, period * 2) * rng.uniform(0.5, 1.5)
    phase = 2 * np.pi * ((xs * np.cos(angle) + ys * np.sin(angle)) / period + warp)
    return (0.5 + 0.5 * np.sin(phase)).astype(np.float32)


def _texture(
    rng: np.random.Generator,
    width: int,
    height: int,
    kind: str,
    scale: float,
    angle: float,
    colours: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    if kind == "noise":
        pattern = _smooth_noise(rng, width, height, scale)
    else:
        pattern = _stripes(rng, width, height, scale, angle)
    low, high = colours
    rgb = low + pattern[..., None] * (high - low)
    rgb += rng.normal(0.0, 4.0, rgb.shape).astype(np.float32)  # sensor-like grain
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _outline(rng: np.random.Generator) -> np.ndarray:
    """A closed star-shaped outline around the origin, as (N, 2) points of radius about 1."""
    shape = rng.choice(["ellipse", "blob", "polygon"])
    if shape == "polygon":
        n = int(rng.integers(5, 10))
        # Evenly spread, jittered angles: clustered ones would give a sliver, not an object.
        theta = (np.arange(n) + rng.uniform(-0.35, 0.35, n)) * (2 * np.pi / n)
        radius = rng.uniform(0.6, 1.0, n)
    else:
        theta = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        if shape == "ellipse":
            a, b, rot = 1.0, rng.uniform(0.45, 1.0), rng.uniform(0, np.pi)
            radius = a * b / np.sqrt((b * np.cos(theta - rot)) ** 2 + (a * np.sin(theta - rot)) ** 2)
        else:
            radius = np.ones_like(theta)
            for k in range(2, 6):
                radius += rng.uniform(0, 0.25 / k * 2) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)


def _rasterise(points: np.ndarray, width: int, height: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points.tolist()], fill=255)
    return np.asarray(canvas) > 0


def _object_mask(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A shape scaled so its area is a sampled fraction of the image, placed fully inside it."""
    outline = _outline(rng)
    target = rng.uniform(*_TARGET_FRACTION)
    x, y = outline[:, 0], outline[:, 1]
    unit_area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    scale = np.sqrt(target * width * height / unit_area)
    span = outline.max(axis=0) - outline.min(axis=0)
    # Shrink if the shape would not fit (elongated shapes in a small or narrow image).
    scale = min(scale, 0.98 * (width - 2) / span[0], 0.98 * (height - 2) / span[1])
    pts = outline * scale
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    centre = np.array(
        [rng.uniform(1 - lo[0], width - 1 - hi[0]), rng.uniform(1 - lo[1], height - 1 - hi[1])]
    )
    mask = _rasterise(pts + centre, width, height)
    # Rasterising adds or loses edge pixels (much of a small object) and squeezing loses area:
    # rescale about the centre until the area is inside the guaranteed range.
    for _ in range(6):
        fraction = float(mask.mean())
        if OBJECT_FRACTION[0] <= fraction <= OBJECT_FRACTION[1]:
            break
        pts = pts * np.sqrt(target / max(fraction, 1e-6))
        mask = _rasterise(pts + centre, width, height)
    return mask


def make_scene(rng: np.random.Generator, size: int | tuple[int, int]) -> Scene:
    """One camouflage scene drawn from `rng`."""
    width, height = _as_size(size)
    kind = str(rng.choice(["noise", "stripes"]))
    # Texture scale follows the image size, but never below a few pixels, where stripes would alias.
    scale = max(6.0, rng.uniform(0.06, 0.15) * min(width, height))
    angle = rng.uniform(0, np.pi)
    low = rng.uniform(40, 200, 3).astype(np.float32)
    high = np.clip(low + rng.uniform(-90, 90, 3), 0, 255).astype(np.float32)
    background = _texture(rng, width, height, kind, scale, angle, (low, high))
    # Same family of texture, a little off in scale and colour: the camouflage.
    shift = rng.uniform(12, 30) * rng.choice([-1.0, 1.0], 3).astype(np.float32)
    obj_colours = (np.clip(low + shift, 0, 255), np.clip(high + shift, 0, 255))
    obj_scale = scale * rng.uniform(0.55, 0.85)
    obj_angle = angle + rng.uniform(-0.35, 0.35)
    obj_layer = _texture(rng, width, height, kind, obj_scale, obj_angle, obj_colours)
    mask = _object_mask(rng, width, height)
    image = np.where(mask[..., None], obj_layer, background)
    return Scene(image=image, mask=mask, background=background)


def synth_record(index: int, size: int | tuple[int, int] = 768, seed: int = 0) -> Record:
    """Record `index` of the synthetic dataset of `seed` (independent of any other index)."""
    scene = make_scene(np.random.default_rng([seed, index]), size)
    return Record(
        id=f"synthetic-{seed}-{index:07d}",
        source="synthetic",
        task="cod",
        image=scene.image,
        mask=scene.mask,
    )


def synth_records(count: int, size: int | tuple[int, int] = 768, seed: int = 0) -> Iterator[Record]:
    """`count` synthetic camouflaged-object records, in memory (images exact, not JPEG-coded)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    for index in range(count):
        yield synth_record(index, size, seed)


def write_synth(
    out_dir: str | Path,
    count: int,
    size: int | tuple[int, int] = 768,
    seed: int = 0,
    *,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write `synth_records(count, size, seed)` as a dataset (images JPEG q95, masks exact PNG);
    returns the manifest."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    width, height = _as_size(size)
    with ShardWriter(out_dir, rows_per_shard=rows_per_shard, overwrite=overwrite) as writer:
        records = synth_records(count, (width, height), seed)
        bar = tqdm(records, total=count, unit="img", desc="synth", disable=None if progress else True)
        for record in bar:
            writer.write(record)
        return writer.finish({"created_by": "segr1 data synth", "seed": seed})
