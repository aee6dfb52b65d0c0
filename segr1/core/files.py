"""Writing local files and folders so a reader never sees half of one.

Every whole-file write of the project (checkpoint state, manifests, configs, masks, metrics) goes
through ``write_atomic``, and every finished folder (exports, sample pictures, the tiny-model cache)
through ``move_into_place``: a crash leaves the old version or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path


def write_atomic(path: Path | str, data: str | bytes) -> None:
    """Write ``data`` to a temporary sibling, flush it to disk, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # atomic on a POSIX file system
    finally:
        tmp.unlink(missing_ok=True)


def move_into_place(tmp: Path, final: Path, replace: bool = True) -> bool:
    """Rename the finished folder ``tmp`` to ``final``; returns whether it landed there.

    An existing ``final`` is renamed aside first and removed after (``replace``), so at every
    moment ``final`` is either the old folder or the new one; with ``replace=False`` an existing
    ``final`` wins (another process built the same thing first) and ``tmp`` is removed.
    """
    stale = final.with_name(f".{final.name}.replaced.{os.getpid()}")
    if final.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)
    try:
        tmp.rename(final)
    except OSError:
        if stale.exists():
            stale.rename(final)  # the old folder back: a failed replace loses nothing
            raise
        if replace or not final.is_dir():  # not a lost race: a real failure
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process built it first
        return False
    shutil.rmtree(stale, ignore_errors=True)
    return True


def mask_file_name(item_id: str) -> str:
    """The mask file of an example or image id (evaluation, batch prediction): safe characters
    kept, others replaced, plus a hash of the id when anything was replaced (so two ids never
    share a file)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", item_id)[:120]
    if safe != item_id or safe.startswith("."):
        safe = f"{safe}-{hashlib.sha1(item_id.encode()).hexdigest()[:10]}"
    return f"{safe}.png"
