"""The one record schema of every segr1 dataset, and the encoding between rows and arrays.

A dataset row keeps the image as encoded bytes (JPEG or PNG) and the mask as a PNG, so shards stay
close to the size of the source files and the image bytes can travel to actors without re-encoding.
`Record` is the decoded form that the rest of the system works with: numpy arrays, image uint8
HxWx3 RGB and mask bool HxW.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from segr1.core.prompts import TEXT_TASKS
from segr1.core.schema import rgb_image

SCHEMA_VERSION = 1
TASKS = ("cod", "sod", "dis", "refer", "reason")
JPEG_QUALITY = 95
MASK_THRESHOLD = 128

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("mask", pa.binary(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("orig_width", pa.int32(), nullable=False),
        pa.field("orig_height", pa.int32(), nullable=False),
        pa.field("texts", pa.list_(pa.string()), nullable=False),
    ],
    metadata={b"segr1.schema_version": str(SCHEMA_VERSION).encode()},
)
COLUMNS = tuple(SCHEMA.names)


class DatasetError(ValueError):
    """Bad dataset input or a damaged dataset; the message names the file and the reason."""


@dataclass
class Record:
    """One decoded example: an image, its ground-truth mask and, for text tasks, its expressions.

    `orig_size` is (width, height) of the source image before any resize, so evaluation can map
    predictions back; it defaults to the image's own size.
    """

    id: str
    source: str
    task: str
    image: np.ndarray
    mask: np.ndarray
    texts: list[str] = field(default_factory=list)
    orig_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"record {self.id!r}: task {self.task!r} is not one of {TASKS}")
        image = rgb_image(np.asarray(self.image), f"record {self.id!r}")
        self.image = image
        self.mask = _as_bool_mask(self.mask, self.id)
        if self.mask.shape != image.shape[:2]:
            raise ValueError(
                f"record {self.id!r}: mask shape {self.mask.shape} differs from image {image.shape[:2]}"
            )
        self.texts = [str(t) for t in self.texts]
        if self.task in TEXT_TASKS and not self.texts:
            raise ValueError(f"record {self.id!r}: task {self.task!r} needs at least one text")
        if self.task not in TEXT_TASKS and self.texts:
            raise ValueError(f"record {self.id!r}: task {self.task!r} carries no texts")
        if self.orig_size is None:
            self.orig_size = self.size
        else:
            self.orig_size = (int(self.orig_size[0]), int(self.orig_size[1]))

    @property
    def size(self) -> tuple[int, int]:
        """Stored (width, height)."""
        return int(self.image.shape[1]), int(self.image.shape[0])


def _as_bool_mask(mask: Any, record_id: str) -> np.ndarray:
    """Accept a bool mask or a uint8 0/1 mask (the system's two mask forms); refuse anything else."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"record {record_id!r}: mask must be HxW, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        return mask
    if mask.dtype == np.uint8 and mask.max(initial=0) <= 1:
        return mask.astype(bool)
    raise ValueError(f"record {record_id!r}: mask must be bool or uint8 0/1, got {mask.dtype}")


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG with full-resolution chroma (4:4:4): camouflage lives in small colour differences at
    object edges, which the default 4:2:0 subsampling smears (up to 20+ grey levels measured on
    fine synthetic textures); it costs about a third more bytes."""
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """PNG, mode L, 0/255: the form the public benchmarks ship their ground truth in."""
    buf = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def binarise_mask(img: Image.Image) -> np.ndarray:
    """Ground truth as bool: grey level >= 128 is object. 16-bit and float masks keep their values."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return np.asarray(img) >= MASK_THRESHOLD
    return np.asarray(img.convert("L")) >= MASK_THRESHOLD


def decode_mask(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return binarise_mask(img)


def encode_record(
    record: Record, *, image_bytes: bytes | None = None, quality: int = JPEG_QUALITY
) -> dict[str, Any]:
    """Row for `SCHEMA`. `image_bytes`, when given, must decode to `record.image` and is stored as is
    (the original file kept byte for byte); otherwise the image is encoded as JPEG."""
    width, height = record.size
    orig_w, orig_h = record.orig_size or record.size
    return {
        "id": record.id,
        "source": record.source,
        "task": record.task,
        "image": image_bytes if image_bytes is not None else encode_jpeg(record.image, quality),
        "mask": encode_mask(record.mask),
        "width": width,
        "height": height,
        "orig_width": orig_w,
        "orig_height": orig_h,
        "texts": list(record.texts),
    }


def decode_record(row: Mapping[str, Any]) -> Record:
    """Decode one row (a dict with `SCHEMA`'s columns); a size that disagrees with the stored
    width/height is a damaged dataset and names the record."""
    rid = row["id"]
    try:
        image = decode_image(row["image"])
        mask = decode_mask(row["mask"])
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"record {rid!r}: cannot decode image or mask: {err}") from err
    stored = (int(row["width"]), int(row["height"]))
    for name, shape in (("image", image.shape), ("mask", mask.shape)):
        if (shape[1], shape[0]) != stored:
            raise DatasetError(
                f"record {rid!r}: {name} is {shape[1]}x{shape[0]} but the row says {stored[0]}x{stored[1]}"
            )
    return Record(
        id=rid,
        source=row["source"],
        task=row["task"],
        image=image,
        mask=mask,
        texts=list(row["texts"] or []),
        orig_size=(int(row["orig_width"]), int(row["orig_height"])),
    )


def check_row(row: Mapping[str, Any]) -> None:
    """Cheap checks on an already encoded row before it is written (no decoding)."""
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise ValueError(f"row {row.get('id')!r} lacks columns {missing}")
    if row["task"] not in TASKS:
        raise ValueError(f"row {row['id']!r}: task {row['task']!r} is not one of {TASKS}")
    if not isinstance(row["id"], str) or not row["id"]:
        raise ValueError(f"row id must be a non-empty string, got {row['id']!r}")


def schema_matches(schema: pa.Schema) -> bool:
    """True when a file's schema is ours (names, types, nullability; metadata ignored)."""
    return schema.remove_metadata().equals(SCHEMA.remove_metadata())
