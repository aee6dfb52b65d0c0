"""Checkpoint layout, publication under a run's storage, and the per-rank RNG state.

A checkpoint root (``<trainer.output_dir>/checkpoints``, a ``segr1.runtime.storage.Storage``: a shared
path or a ``pyarrow.fs`` URI) holds one directory per saved step plus a ``latest`` file naming
the newest::

    root/
      latest                  "step_12"
      step_12/
        deepspeed/            DeepSpeed's own files: module, optimizer and scheduler states
        client_state.json     the caller's state (data position, step, weight version)
        rng_rank0.json ...    each rank's torch / numpy / python RNG state

Every rank writes into ``step_N.tmp`` (straight into it on a path; on a URI into a local staging
folder it then uploads); only after all of them are done does rank 0 move it to ``step_N`` and
replace ``latest``, so a crash at any point leaves the previous checkpoint as the one ``latest``
names. The learner's ranks find and read checkpoints themselves: the driver's disk may not hold
them. DeepSpeed's files are torch pickles: they are written by this code, and only ever loaded
from a directory this code published.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segr1.core.files import write_atomic
from segr1.runtime.storage import Storage

LATEST = "latest"
CLIENT_STATE = "client_state.json"
DEEPSPEED_TAG = "deepspeed"
TMP_SUFFIX = ".tmp"
_STEP = re.compile(r"step_\d+")
_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or not one of ours; the message names it."""


def step_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step_{step}"


def tmp_name(name: str) -> str:
    return f"{name}{TMP_SUFFIX}"


def client_state_text(client_state: dict[str, Any]) -> str:
    try:
        return json.dumps(client_state, indent=2, sort_keys=True) + "\n"
    except TypeError as exc:
        raise ValueError(f"client_state must be JSON-serialisable: {exc}") from exc


def read_client_state(root: Storage, name: str) -> dict[str, Any]:
    try:
        return json.loads(root.read_text(f"{name}/{CLIENT_STATE}"))
    except FileNotFoundError:
        raise CheckpointError(f"{root.path(name)}: no {CLIENT_STATE}; not a complete segr1 checkpoint") from None
    except ValueError as exc:
        raise CheckpointError(f"{root.path(name)}/{CLIENT_STATE}: unreadable JSON: {exc}") from exc


def publish(root: Storage, name: str, client_state: dict[str, Any]) -> str:
    """Add the caller's state to the finished ``name.tmp``, move it to ``name``, point ``latest`` at it."""
    tmp = tmp_name(name)
    root.write_text(f"{tmp}/{CLIENT_STATE}", client_state_text(client_state))
    root.move(tmp, name)  # saving a step again (after a resume) replaces it
    root.write_text(LATEST, name + "\n")
    return root.path(name)


def latest(root: Storage) -> str | None:
    """The step directory ``latest`` names under ``root``, checked complete; None if there is none yet."""
    try:
        name = root.read_text(LATEST).strip()
    except FileNotFoundError:
        return None
    if not _STEP.fullmatch(name):
        raise CheckpointError(f"{root.path(LATEST)}: does not name a step directory: {name!r}")
    if not root.exists(f"{name}/{CLIENT_STATE}") or not root.exists(f"{name}/{DEEPSPEED_TAG}"):
        raise CheckpointError(
            f"{root.path(name)}: not a complete segr1 checkpoint (needs {CLIENT_STATE} and {DEEPSPEED_TAG}/)"
        )
    return name


def rank_needs(relative: str, rank: int) -> bool:
    """Whether ``rank`` reads this checkpoint file: shared files and its own shard and RNG only."""
    match = _RANK_FILE.search(relative)
    return match is None or int(match.group(1)) == rank


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
    write_atomic(rng_file(step_dir, rank), json.dumps(rng_state()))


def load_rng(step_dir: Path, rank: int) -> None:
    """Restore this rank's RNG; a checkpoint saved with fewer ranks leaves the extra ranks as seeded."""
    path = rng_file(step_dir, rank)
    if path.is_file():
        set_rng_state(json.loads(path.read_text()))
