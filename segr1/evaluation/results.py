"""Per-example results on disk, written so that a crashed run resumes where it stopped.

Each benchmark gets a folder in the output directory:

    <out>/<benchmark key>/settings.json    what produced the results (policy, sizes, sampling)
    <out>/<benchmark key>/records.jsonl    one JSON line per finished example
    <out>/<benchmark key>/masks/<id>.png   its predicted mask, 0/255, at the image's original size

The mask is written first (temp name, then renamed), then its line is appended, flushed and
fsynced, so a line always has its mask. On restart, lines already there are skipped; a torn last
line (the crash hit mid-write) is cut off, and a line whose mask is gone is redone. Reusing a
folder made with different settings is refused, so one table never mixes two configurations.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segr1.core.files import write_atomic
from segr1.data.records import decode_mask, encode_mask

RECORDS_FILE = "records.jsonl"
SETTINGS_FILE = "settings.json"
MASKS_DIR = "masks"


class EvalError(RuntimeError):
    """An evaluation that cannot go on; the message names the file and the reason."""


@dataclass
class EvalResult:
    """One evaluated example: where its mask is, what the policy wrote and how it parsed.

    ``empty`` is true when the completion gave no usable prompt, so the prediction is an empty mask.
    Coordinates (``boxes``, ``points``) are in the policy image's pixels (``policy_size``).
    ``intersection``/``union`` are pixel counts against the ground truth at original size, with
    ignored pixels (ReasonSeg) left out.
    """

    id: str
    mask: str
    expression: str | None
    completion: str
    empty: bool
    format_ok: bool
    parse_errors: list[str]
    boxes: list[list[float]]
    points: list[list[float]]
    labels: list[int]
    policy_size: list[int]
    image_size: list[int]
    intersection: int
    union: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def iou(self) -> float:
        return 1.0 if self.union == 0 else self.intersection / self.union

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalResult:
        return cls(**data)


def read_mask_png(path: Path) -> np.ndarray:
    """A saved prediction (or any 0/255 PNG) as bool; unreadable files name themselves."""
    try:
        return decode_mask(path.read_bytes())
    except Exception as err:  # noqa: BLE001 - image decoders raise many exception types
        raise EvalError(f"{path}: unreadable mask: {type(err).__name__}: {err}") from err


class ResultStore:
    """The results folder of one benchmark; ``done`` maps finished ids to their results."""

    def __init__(self, directory: str | Path, settings: dict[str, Any], restart: bool = False) -> None:
        self.directory = Path(directory)
        self.masks_dir = self.directory / MASKS_DIR
        self.records_path = self.directory / RECORDS_FILE
        self.masks_dir.mkdir(parents=True, exist_ok=True)
        self._check_settings(settings, restart)
        self.done: dict[str, EvalResult] = {} if restart else self._load()
        if restart and self.records_path.exists():
            self.records_path.unlink()

    def _check_settings(self, settings: dict[str, Any], restart: bool) -> None:
        path = self.directory / SETTINGS_FILE
        wanted = json.loads(json.dumps(settings))  # normalise tuples and the like as JSON would
        if path.exists() and not restart:
            try:
                saved = json.loads(path.read_text())
            except ValueError as err:
                raise EvalError(f"{path}: unreadable settings: {err}") from err
            differing = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            if differing:
                detail = "; ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} now" for k in differing)
                raise EvalError(
                    f"{self.directory}: holds results made with other settings ({detail}); "
                    "use another --out, or --restart to discard them"
                )
        write_atomic(path, json.dumps(wanted, indent=2) + "\n")

    def _load(self) -> dict[str, EvalResult]:
        if not self.records_path.exists():
            return {}
        data = self.records_path.read_bytes()
        complete, newline, tail = data.rpartition(b"\n")
        results = []
        for number, line in enumerate(complete.split(b"\n") if newline else [], start=1):
            if line.strip():
                try:
                    results.append(EvalResult.from_json(json.loads(line)))
                except (ValueError, TypeError) as err:
                    raise EvalError(f"{self.records_path}:{number}: unreadable result line: {err}") from err
        if tail.strip():  # no newline after the last line: the run stopped while writing it
            try:
                results.append(EvalResult.from_json(json.loads(tail)))
                with self.records_path.open("ab") as f:
                    f.write(b"\n")
            except (ValueError, TypeError):
                with self.records_path.open("r+b") as f:
                    f.truncate(len(complete) + len(newline))  # torn: cut it off, it is redone
        # A result whose mask file is gone is redone too.
        return {r.id: r for r in results if (self.masks_dir / r.mask).is_file()}

    def add(self, result: EvalResult, mask: np.ndarray) -> None:
        """Save the mask, then append the result line durably."""
        write_atomic(self.masks_dir / result.mask, encode_mask(mask))
        line = json.dumps(asdict(result), separators=(",", ":")) + "\n"
        with self.records_path.open("ab") as f:
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        self.done[result.id] = result

    def mask(self, result: EvalResult) -> np.ndarray:
        return read_mask_png(self.masks_dir / result.mask)
