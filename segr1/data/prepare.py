"""`segr1 data prepare`: image/ground-truth folders -> a dataset of Parquet shards.

Every folder is listed before anything is written, so a wrong path fails at once. Then each pair is
decoded, checked (mask present, both files readable, same size), resized (image bicubic, mask
nearest, then binarised at 128) or kept at its original size, and written. A bad pair stops the run
with its path and reason, unless `skip_bad` is set, in which case it is counted, listed in the
manifest and reported.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from segr1.data.layouts import Pair, PairSource, list_pairs
from segr1.data.records import DatasetError, Record, binarise_mask, encode_jpeg, encode_record
from segr1.data.shards import DEFAULT_ROWS_PER_SHARD, ShardWriter

DEFAULT_SIZE = (768, 768)  # the paper trains at 768 x 768
KEEP_FORMATS = ("JPEG", "PNG")


@dataclass(frozen=True)
class BadPair:
    """A pair that cannot become a record. `kind` is one of: missing mask, unreadable image,
    unreadable mask, size mismatch."""

    path: str
    kind: str
    detail: str

    def message(self) -> str:
        return f"{self.path}: {self.kind}: {self.detail}"


@dataclass(frozen=True)
class PairJob:
    """Everything a worker process needs to turn one pair into a row (picklable)."""

    pair: Pair
    source: str
    task: str
    mask_dir: Path
    size: tuple[int, int] | None


@dataclass
class PrepareReport:
    out_dir: Path
    counts: dict[str, int]
    skipped: list[BadPair]
    excluded: dict[str, int]
    shards: int
    size: tuple[int, int] | None
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """The lines `segr1 data prepare` prints at the end."""
        size = "original size" if self.size is None else f"{self.size[0]}x{self.size[1]}"
        lines = [f"wrote {self.total} records in {self.shards} shards to {self.out_dir} ({size})"]
        width = max(len(s) for s in self.counts) if self.counts else 0
        lines += [f"  {source:<{width}}  {n}" for source, n in self.counts.items()]
        for source, n in self.excluded.items():
            lines.append(f"excluded {n} non-camouflaged images of {source} (by convention)")
        if self.skipped:
            kinds = Counter(b.kind for b in self.skipped)
            detail = ", ".join(f"{kind}: {n}" for kind, n in sorted(kinds.items()))
            lines.append(f"skipped {len(self.skipped)} bad pairs ({detail}); listed in manifest.json")
        return "\n".join(lines)


def _open_image(path: Path) -> tuple[bytes, Image.Image]:
    data = path.read_bytes()
    img = Image.open(io.BytesIO(data))
    img.load()  # decode now: a truncated file fails here, not later in training
    return data, img


def load_pair(job: PairJob) -> dict[str, Any] | BadPair:
    """One encoded row, or the reason the pair is bad. Never raises for bad files."""
    pair = job.pair
    if pair.mask is None:
        expected = job.mask_dir / f"{pair.stem}.png"
        return BadPair(str(pair.image), "missing mask", f"no ground truth {expected}")
    # Image decoders are foreign-format parsers that fail with many exception types
    # (OSError, SyntaxError, ValueError, DecompressionBombError...): any failure means unreadable.
    try:
        image_bytes, img = _open_image(pair.image)
    except Exception as err:  # noqa: BLE001
        return BadPair(str(pair.image), "unreadable image", f"{type(err).__name__}: {err}")
    try:
        _, mask_img = _open_image(pair.mask)
    except Exception as err:  # noqa: BLE001
        return BadPair(str(pair.mask), "unreadable mask", f"{type(err).__name__}: {err}")
    if mask_img.size != img.size:
        return BadPair(
            str(pair.mask),
            "size mismatch",
            f"mask is {mask_img.size[0]}x{mask_img.size[1]}, image {pair.image} is "
            f"{img.size[0]}x{img.size[1]}",
        )
    orig_size = img.size
    rgb = img.convert("RGB")
    mask = binarise_mask(mask_img)
    if job.size is None or job.size == orig_size:
        kept = image_bytes if img.format in KEEP_FORMATS else None
        image = np.asarray(rgb)
    else:
        rgb = rgb.resize(job.size, Image.Resampling.BICUBIC)
        kept = None
        image = np.asarray(rgb)
        grey = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
        mask = np.asarray(grey.resize(job.size, Image.Resampling.NEAREST)) >= 128
    if kept is None and job.size is None:
        # An odd format at original size: store losslessly rather than add JPEG loss.
        buf = io.BytesIO()
        rgb.save(buf, format="PNG")
        kept = buf.getvalue()
    record = Record(
        id=f"{job.source}/{pair.stem}",
        source=job.source,
        task=job.task,
        image=image,
        mask=mask,
        orig_size=orig_size,
    )
    return encode_record(record, image_bytes=kept if kept is not None else encode_jpeg(image))


def _results(jobs: list[PairJob], workers: int) -> Iterator[dict[str, Any] | BadPair]:
    """Rows in job order; with several workers decoding runs in parallel, order is kept."""
    if workers <= 1:
        yield from map(load_pair, jobs)
        return
    pool = ProcessPoolExecutor(max_workers=workers)
    try:
        yield from pool.map(load_pair, jobs, chunksize=8)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def prepare_dataset(
    sources: Sequence[PairSource],
    out_dir: str | Path,
    *,
    size: tuple[int, int] | None = DEFAULT_SIZE,
    skip_bad: bool = False,
    overwrite: bool = False,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    workers: int = 1,
    progress: bool = False,
) -> PrepareReport:
    """Convert image/mask folder pairs into a dataset at `out_dir`.

    `size` is the stored (width, height), or None to keep each image's original size and bytes.
    Raises `DatasetError` naming the path and reason for the first bad pair unless `skip_bad`;
    nothing is left in `out_dir` when it raises.
    """
    if not sources:
        raise DatasetError("nothing to prepare: give at least one layout or pair")
    if size is not None and (size[0] < 1 or size[1] < 1):
        raise ValueError(f"size must be positive, got {size}")
    jobs: list[PairJob] = []
    excluded: dict[str, int] = {}
    for src in sources:
        pairs, n_excluded = list_pairs(src)
        if n_excluded:
            excluded[src.source] = excluded.get(src.source, 0) + n_excluded
        jobs += [PairJob(p, src.source, src.task, src.mask_dir, size) for p in pairs]

    skipped: list[BadPair] = []
    with ShardWriter(out_dir, rows_per_shard=rows_per_shard, overwrite=overwrite) as writer:
        # disable=None: a bar on a terminal only, so logs and pipes get just the summary.
        bar = tqdm(total=len(jobs), unit="img", desc="prepare", disable=None if progress else True)
        # closing(): a bad pair must stop the worker pool at once, not after it drains the queue.
        with bar, closing(_results(jobs, workers)) as results:
            for result in results:
                bar.update()
                if isinstance(result, BadPair):
                    if not skip_bad:
                        raise DatasetError(result.message())
                    skipped.append(result)
                    continue
                writer.write(result)
        if writer.count == 0:
            raise DatasetError(f"{out_dir}: no records: all {len(jobs)} pairs were bad")
        manifest = writer.finish(
            {
                "created_by": "segr1 data prepare",
                "resize": None if size is None else list(size),
                "excluded": excluded,
                "skipped": [{"path": b.path, "reason": f"{b.kind}: {b.detail}"} for b in skipped],
            }
        )
    return PrepareReport(
        out_dir=Path(out_dir),
        counts=dict(manifest["sources"]),
        skipped=skipped,
        excluded=excluded,
        shards=len(manifest["shards"]),
        size=size,
        manifest=manifest,
    )
