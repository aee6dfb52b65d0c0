"""`segr1 data synth`: synthetic camouflaged- or salient-object datasets with exact masks.

Each scene is a textured background (smoothed multi-octave noise or warped stripes) with one
object, an ellipse, a smooth blob or a polygon, filled with a texture of the same kind. The object
is pasted without blending, so the mask is exactly the set of pixels that came from the object
layer. Record i depends only on (seed, i), so a larger dataset extends a smaller one.

- ``camouflage`` (task ``cod``): the object's texture is the background's at a slightly different
  scale and a slightly shifted colour: hard to see, but separable.
- ``salient`` (task ``sod``): a bright object on a dark background, whatever their colours, so
  one fixed brightness threshold separates them.

``position_code`` rewrites a scene so that its pixels say where they are: red carries the
scene's brightness, green the column (0 at the left edge, 255 at the right) and blue the row.
Qwen2.5-VL has no absolute position embedding, and a tiny random one cannot learn in minutes to
turn its rotary attention into coordinates; with the code, an image token's own colour says where
it is. The learning benchmark trains its tiny policy on such scenes (docs/training.md).
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
KINDS = {"camouflage": "cod", "salient": "sod"}  # scene kind: the task its records carry
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


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"synthetic scene kind must be one of {sorted(KINDS)}, got {kind!r}")
    return kind


def make_scene(
    rng: np.random.Generator, size: int | tuple[int, int], kind: str = "camouflage", position_code: bool = False
) -> Scene:
    """One scene of `kind` drawn from `rng`, optionally position-coded (see the module docstring)."""
    width, height = _as_size(size)
    make = _camouflage_scene if _check_kind(kind) == "camouflage" else _salient_scene
    scene = make(rng, width, height)
    if not position_code:
        return scene
    return Scene(image=_position_code(scene.image), mask=scene.mask, background=_position_code(scene.background))


def _texture_style(rng: np.random.Generator, width: int, height: int) -> tuple[str, float, float]:
    """The background's texture kind, scale and stripe angle; the object's is drawn relative to them."""
    kind = str(rng.choice(["noise", "stripes"]))
    # Texture scale follows the image size, but never below a few pixels, where stripes would alias.
    scale = max(6.0, rng.uniform(0.06, 0.15) * min(width, height))
    return kind, scale, rng.uniform(0, np.pi)


def _paste_object(rng: np.random.Generator, background: np.ndarray, obj_layer: np.ndarray) -> Scene:
    """Cut an object shape out of `obj_layer` and paste it, unblended, onto `background`."""
    height, width, _ = background.shape
    mask = _object_mask(rng, width, height)
    return Scene(image=np.where(mask[..., None], obj_layer, background), mask=mask, background=background)


def _camouflage_scene(rng: np.random.Generator, width: int, height: int) -> Scene:
    kind, scale, angle = _texture_style(rng, width, height)
    low = rng.uniform(40, 200, 3).astype(np.float32)
    high = np.clip(low + rng.uniform(-90, 90, 3), 0, 255).astype(np.float32)
    background = _texture(rng, width, height, kind, scale, angle, (low, high))
    # Same family of texture, a little off in scale and colour: the camouflage.
    shift = rng.uniform(12, 30) * rng.choice([-1.0, 1.0], 3).astype(np.float32)
    obj_colours = (np.clip(low + shift, 0, 255), np.clip(high + shift, 0, 255))
    obj_scale = scale * rng.uniform(0.55, 0.85)
    obj_angle = angle + rng.uniform(-0.35, 0.35)
    obj_layer = _texture(rng, width, height, kind, obj_scale, obj_angle, obj_colours)
    return _paste_object(rng, background, obj_layer)


# Channel ranges of the salient kind: the object's darkest texture value (SALIENT_OBJECT[0]) is
# 40 above the background's brightest (sum of SALIENT_BACKGROUND's upper ends), far beyond the grain.
SALIENT_BACKGROUND = ((10.0, 60.0), (0.0, 60.0))  # low colour, then how far high lies above it
SALIENT_OBJECT = ((160.0, 215.0), (0.0, 40.0))


def _salient_scene(rng: np.random.Generator, width: int, height: int) -> Scene:
    kind, scale, angle = _texture_style(rng, width, height)

    def colours(ranges: tuple[tuple[float, float], tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
        low = rng.uniform(*ranges[0], 3).astype(np.float32)
        return low, np.clip(low + rng.uniform(*ranges[1], 3), 0, 255).astype(np.float32)

    background = _texture(rng, width, height, kind, scale, angle, colours(SALIENT_BACKGROUND))
    obj_layer = _texture(rng, width, height, kind, scale * rng.uniform(0.55, 0.85), angle, colours(SALIENT_OBJECT))
    return _paste_object(rng, background, obj_layer)


def _position_code(image: np.ndarray) -> np.ndarray:
    """Red: the image's brightness (mean of its channels); green: the column; blue: the row."""
    height, width, _ = image.shape
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    coded = np.stack(
        [image.astype(np.float32).mean(axis=2), 255 * cols / max(width - 1, 1), 255 * rows / max(height - 1, 1)],
        axis=2,
    )
    return np.clip(np.rint(coded), 0, 255).astype(np.uint8)


def synth_record(
    index: int, size: int | tuple[int, int] = 768, seed: int = 0, kind: str = "camouflage",
    position_code: bool = False,
) -> Record:
    """Record `index` of the synthetic dataset of (`seed`, `kind`, `position_code`), independent of
    any other index. Ids name the kind and the code, except the original camouflage ones."""
    scene = make_scene(np.random.default_rng([seed, index]), size, kind, position_code)
    name = "synthetic" + ("" if kind == "camouflage" else f"-{kind}") + ("-xy" if position_code else "")
    return Record(
        id=f"{name}-{seed}-{index:07d}",
        source="synthetic",
        task=KINDS[kind],
        image=scene.image,
        mask=scene.mask,
    )


def synth_records(
    count: int, size: int | tuple[int, int] = 768, seed: int = 0, kind: str = "camouflage",
    position_code: bool = False,
) -> Iterator[Record]:
    """`count` synthetic records, in memory (images exact, not JPEG-coded)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    _check_kind(kind)  # here, not on the first record: nothing is written for a bad kind
    return (synth_record(index, size, seed, kind, position_code) for index in range(count))


def write_synth(
    out_dir: str | Path,
    count: int,
    size: int | tuple[int, int] = 768,
    seed: int = 0,
    *,
    kind: str = "camouflage",
    position_code: bool = False,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write `synth_records(count, size, seed, kind, position_code)` as a dataset (images JPEG q95,
    masks exact PNG); returns the manifest."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    width, height = _as_size(size)
    records = synth_records(count, (width, height), seed, kind, position_code)
    with ShardWriter(out_dir, rows_per_shard=rows_per_shard, overwrite=overwrite) as writer:
        bar = tqdm(records, total=count, unit="img", desc="synth", disable=None if progress else True)
        for record in bar:
            writer.write(record)
        return writer.finish(
            {"created_by": "segr1 data synth", "seed": seed, "kind": kind, "position_code": position_code}
        )
