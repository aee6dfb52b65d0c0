"""Streaming records out of a dataset, with a seeded shuffle and a resumable position.

Only one shard is in memory at a time. With shuffling, each epoch visits the shards in an order
drawn from (seed, epoch) and the rows of each shard in an order drawn from (seed, epoch, shard), so
the whole sequence is a pure function of the seed; the position inside it is (epoch, number of
records already handed out in that epoch). Resuming from a saved position skips whole shards by
their row counts and then rows inside one shard, without decoding what it skips.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from segr1.data.records import DatasetError, Record, decode_record, schema_matches
from segr1.data.shards import read_manifest


def _shard_list(path: Path) -> tuple[list[Path], list[int]]:
    """Shard files and their row counts: from the manifest for a directory, from the file's
    footer for a single shard."""
    if path.is_dir():
        manifest = read_manifest(path)
        files = [path / s["file"] for s in manifest["shards"]]
        rows = [int(s["rows"]) for s in manifest["shards"]]
        if sum(rows) != manifest.get("count", sum(rows)):
            raise DatasetError(f"{path}: manifest count disagrees with its shards' rows")
        return files, rows
    if path.is_file():
        try:
            return [path], [pq.ParquetFile(path).metadata.num_rows]
        except (OSError, pa.ArrowException) as err:
            raise DatasetError(f"{path}: unreadable shard: {err}") from err
    raise DatasetError(f"{path}: no such dataset directory or shard file")


class ShardReader:
    """Iterate `Record`s of a dataset directory (or one `.parquet` shard).

    `shuffle`: seeded order per epoch (shards, then rows within each shard); otherwise stored order.
    `epochs`: how many passes to make; None repeats forever. Iterating advances the reader's
    position, so `state_dict()` taken between records and given to `load_state_dict()` of a new
    reader continues exactly where this one stopped. One iteration at a time per reader.
    """

    def __init__(
        self,
        path: str | Path,
        shuffle: bool = True,
        seed: int = 0,
        epochs: int | None = None,
    ) -> None:
        if epochs is not None and epochs < 0:
            raise ValueError(f"epochs must be >= 0 or None, got {epochs}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.path = Path(path)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epochs = epochs
        self._files, self._rows = _shard_list(self.path)
        self._epoch = 0
        self._position = 0

    def __len__(self) -> int:
        """Records per epoch."""
        return sum(self._rows)

    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at a saved position; the saved seed replaces this reader's so the order matches."""
        epoch, position, seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        if epoch < 0 or seed < 0 or not 0 <= position <= len(self):
            raise ValueError(f"state {dict(state)} does not fit a dataset of {len(self)} records")
        self._epoch, self._position, self.seed = epoch, position, seed

    def _shard_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self._files))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self._files))

    def _row_order(self, epoch: int, shard: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self._rows[shard])
        return np.random.default_rng([self.seed, epoch, shard + 1]).permutation(self._rows[shard])

    def _read_shard(self, shard: int) -> pa.Table:
        path = self._files[shard]
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as err:
            raise DatasetError(f"{path}: unreadable shard: {err}") from err
        if not schema_matches(table.schema):
            raise DatasetError(f"{path}: schema is not the segr1 record schema: {table.schema}")
        if table.num_rows != self._rows[shard]:
            raise DatasetError(
                f"{path}: holds {table.num_rows} rows, the manifest says {self._rows[shard]}"
            )
        return table

    def __iter__(self) -> Iterator[Record]:
        if len(self) == 0:
            return
        while self.epochs is None or self._epoch < self.epochs:
            skip = self._position
            for shard in self._shard_order(self._epoch):
                if skip >= self._rows[shard]:
                    skip -= self._rows[shard]
                    continue
                table = self._read_shard(int(shard))
                for row_index in self._row_order(self._epoch, int(shard))[skip:]:
                    row = table.slice(int(row_index), 1).to_pylist()[0]
                    try:
                        record = decode_record(row)
                    except DatasetError as err:
                        raise DatasetError(f"{self._files[shard]}: {err}") from err
                    # Count before handing out: a state saved now means "this one is consumed".
                    self._position += 1
                    yield record
                skip = 0
            self._epoch += 1
            self._position = 0
