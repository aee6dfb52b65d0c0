"""Writing a dataset directory: Parquet shards plus a manifest, every file published by rename.

A reader trusts a directory only when `manifest.json` is there, and the manifest is written last,
so a crash or an error half way never leaves something that looks like a finished dataset. Each
shard is written to `<name>.parquet.tmp` and `os.replace`d into place once closed.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from segr1.core.files import write_atomic
from segr1.data.records import SCHEMA, SCHEMA_VERSION, DatasetError, Record, check_row, encode_record

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "segr1-records"
DEFAULT_ROWS_PER_SHARD = 500
DEFAULT_ROWS_PER_GROUP = 64
# Images and PNG masks are compressed already; compressing them again costs time for nothing.
_COMPRESSION = {name: ("none" if name in ("image", "mask") else "zstd") for name in SCHEMA.names}


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a finished dataset directory, checked for the fields the reader needs."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise DatasetError(
            f"{path}: no manifest; {directory} is not a finished segr1 dataset "
            "(a run that failed or is still writing leaves none)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: unreadable manifest: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path}: not a {FORMAT_NAME} manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DatasetError(
            f"{path}: schema version {manifest.get('schema_version')} is not {SCHEMA_VERSION}"
        )
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("rows"), int)
        for s in shards
    ):
        raise DatasetError(f"{path}: 'shards' must list {{file, rows}} entries")
    return manifest


class ShardWriter:
    """Write records into `<out_dir>/<prefix>-NNNNN.parquet` shards and a manifest.

    Use as a context manager: leaving the block normally finishes the dataset (writes the
    manifest); leaving it by an exception removes every file this writer created. `finish(extra)`
    may be called inside the block to add fields to the manifest (the command that made it, what was
    skipped). Ids must be unique within the dataset.
    """

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str = "part",
        rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
        *,
        overwrite: bool = False,
        rows_per_group: int = DEFAULT_ROWS_PER_GROUP,
    ) -> None:
        if rows_per_shard < 1 or rows_per_group < 1:
            raise ValueError("rows_per_shard and rows_per_group must be >= 1")
        if not prefix or "/" in prefix or os.sep in prefix:
            raise ValueError(f"prefix must be a plain file-name part, got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.rows_per_shard = rows_per_shard
        self.rows_per_group = min(rows_per_group, rows_per_shard)
        self._prepare_dir(overwrite)
        self._shards: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._shard_rows = 0
        self._ids: set[str] = set()
        self._sources: Counter[str] = Counter()
        self._tasks: Counter[str] = Counter()
        self._sizes: set[tuple[int, int]] = set()
        self._manifest: dict[str, Any] | None = None
        self._closed = False

    def _prepare_dir(self, overwrite: bool) -> None:
        """Refuse to mix with an existing dataset unless asked to replace it."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        manifest = self.out_dir / MANIFEST_NAME
        stale = sorted(self.out_dir.glob(f"{self.prefix}-*.parquet*"))
        if manifest.exists():
            if not overwrite:
                raise DatasetError(
                    f"{self.out_dir}: already holds a dataset ({MANIFEST_NAME}); "
                    "pass --overwrite (overwrite=True) to replace it"
                )
            try:
                listed = [self.out_dir / s["file"] for s in read_manifest(self.out_dir)["shards"]]
            except DatasetError:
                listed = []
            # The manifest goes first, so an interrupted overwrite never looks finished.
            manifest.unlink()
            stale = sorted(set(stale) | {p for p in listed if p.parent == self.out_dir})
        elif stale and not overwrite:
            raise DatasetError(
                f"{self.out_dir}: holds shard files without a manifest ({stale[0].name}, ...), "
                "left by an unfinished run; pass --overwrite (overwrite=True) to replace them"
            )
        for path in stale:
            path.unlink(missing_ok=True)

    # -- writing ---------------------------------------------------------------------------

    def write(self, item: Record | Mapping[str, Any]) -> None:
        """Add a `Record` (encoded here, image as JPEG) or an already encoded row."""
        if self._closed:
            raise RuntimeError("ShardWriter is finished or aborted")
        row = encode_record(item) if isinstance(item, Record) else dict(item)
        check_row(row)
        if row["id"] in self._ids:
            raise DatasetError(f"{self.out_dir}: duplicate record id {row['id']!r}")
        self._ids.add(row["id"])
        self._sources[row["source"]] += 1
        self._tasks[row["task"]] += 1
        self._sizes.add((int(row["width"]), int(row["height"])))
        self._pending.append(row)
        self._shard_rows += 1
        if len(self._pending) >= self.rows_per_group:
            self._flush_group()
        if self._shard_rows >= self.rows_per_shard:
            self._close_shard()

    @property
    def count(self) -> int:
        return len(self._ids)

    def _shard_path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}-{index:05d}.parquet"

    def _tmp_path(self, index: int) -> Path:
        path = self._shard_path(index)
        return path.with_name(path.name + ".tmp")

    def _flush_group(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(
                self._tmp_path(len(self._shards)), SCHEMA, compression=_COMPRESSION
            )
        self._writer.write_table(pa.Table.from_pylist(self._pending, schema=SCHEMA))
        self._pending = []

    def _close_shard(self) -> None:
        self._flush_group()
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        index = len(self._shards)
        os.replace(self._tmp_path(index), self._shard_path(index))
        self._shards.append({"file": self._shard_path(index).name, "rows": self._shard_rows})
        self._shard_rows = 0

    # -- finishing -------------------------------------------------------------------------

    def finish(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Close the last shard and publish the manifest; returns the manifest. Idempotent."""
        if self._manifest is not None:
            return self._manifest
        if self._closed:
            raise RuntimeError("ShardWriter was aborted")
        self._close_shard()
        size = list(next(iter(self._sizes))) if len(self._sizes) == 1 else None
        manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "count": self.count,
            "sources": dict(self._sources),
            "tasks": dict(self._tasks),
            "size": size,
            "shards": self._shards,
        }
        manifest.update(extra or {})
        write_atomic(self.out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        self._manifest = manifest
        self._closed = True
        return manifest

    def abort(self) -> None:
        """Remove every shard (finished or temporary) that this writer created."""
        if self._manifest is not None:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for index in range(len(self._shards) + 1):
            self._tmp_path(index).unlink(missing_ok=True)
            self._shard_path(index).unlink(missing_ok=True)
        self._pending = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()
