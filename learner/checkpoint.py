"""Checkpoint layout, atomic publication, and the per-rank RNG state.

A checkpoint root holds one directory per saved step plus a ``latest`` file naming the newest::

    root/
      latest                  "step_12"
      step_12/
        deepspeed/            DeepSpeed's own files: module, optimizer and scheduler states
        client_state.json     the caller's state (data position, step, weight version)
        rng_rank0.json ...    each rank's torch / numpy / python RNG state

Every rank writes into ``step_N.tmp``; only after all of them are done does rank 0 rename it to
``step_N`` and replace ``latest`` (temp file + ``os.replace``), so a crash at any point leaves the
previous checkpoint as the one ``latest`` names. DeepSpeed's files are torch pickles: they are
written by this code, and only ever loaded from a directory this code published.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"
CLIENT_STATE = "client_state.json"
DEEPSPEED_TAG = "deepspeed"
TMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or not one of ours; the message names it."""


def step_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step_{step}"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp sibling, flush it to disk, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_client_state(step_dir: Path, client_state: dict[str, Any]) -> None:
    try:
        text = json.dumps(client_state, indent=2, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"client_state must be JSON-serialisable: {exc}") from exc
    write_text_atomic(step_dir / CLIENT_STATE, text + "\n")


def read_client_state(step_dir: Path) -> dict[str, Any]:
    path = step_dir / CLIENT_STATE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir}: no {CLIENT_STATE}; not a complete segr1 checkpoint") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: unreadable JSON: {exc}") from exc


def publish(tmp_dir: Path, root: Path, name: str) -> Path:
    """Rename a finished ``tmp_dir`` to ``root/name`` and point ``latest`` at it."""
    final = root / name
    if final.exists():
        # Saving the same step again (e.g. after a resume): move the old one aside first, since a
        # directory rename cannot replace a non-empty directory.
        stale = root / f".{name}.replaced.{os.getpid()}"
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)
        tmp_dir.rename(final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        tmp_dir.rename(final)
    write_text_atomic(root / LATEST, name + "\n")
    return final


def resolve(path: str | Path) -> Path:
    """The step directory to load: ``path`` itself, or the one its ``latest`` file names."""
    path = Path(path)
    latest = path / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        if not name or "/" in name or name.startswith("."):
            raise CheckpointError(f"{latest}: does not name a step directory: {name!r}")
        path = path / name
    if not (path / CLIENT_STATE).is_file() or not (path / DEEPSPEED_TAG).is_dir():
        raise CheckpointError(
            f"{path}: not a complete segr1 checkpoint (needs {CLIENT_STATE} and {DEEPSPEED_TAG}/, "
            f"or a {LATEST} file naming such a directory)"
        )
    return path


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-able data (no pickles)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def rng_file(step_dir: Path, rank: int) -> Path:
    return step_dir / f"rng_rank{rank}.json"


def save_rng(step_dir: Path, rank: int) -> None:
    write_text_atomic(rng_file(step_dir, rank), json.dumps(rng_state()))


def load_rng(step_dir: Path, rank: int) -> None:
    """Restore this rank's RNG; a checkpoint saved with fewer ranks leaves the extra ranks as seeded."""
    path = rng_file(step_dir, rank)
    if path.is_file():
        set_rng_state(json.loads(path.read_text()))
