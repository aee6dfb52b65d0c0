"""Where a run's checkpoints and export live: a path every node mounts, or a ``pyarrow.fs`` URI.

On a cluster the driver (often on a GPU-less head) and the learner's ranks (on GPU nodes) have
different disks, and a relative path (the presets' ``runs/cod``) names another folder on each.
A run's ``trainer.output_dir`` is therefore one ``Storage``: a path, made absolute on the driver
so it names the same folder everywhere, which must be a shared mount (NFS, EFS, Filestore) when
the roles sit on several nodes; or a URI that ``pyarrow.fs`` understands (``s3://``, ``gs://``,
``hdfs://``; ``file://`` is a path). The job proves at start-up that every learner rank reads what
the driver wrote there (``write_probe`` / ``check_probe``), and stops with the reason otherwise.

A path is written in place (DeepSpeed writes its files straight into it); a remote URI is written
through a local staging folder that ``upload``/``download`` copy with ``pyarrow.fs.copy_files``.
Text files are written whole under a temporary name and then moved over the real one.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from segr1.core.files import move_into_place, write_atomic

PROBE_PREFIX = ".segr1-storage-probe-"


def shown(location: str) -> str:
    """``location`` fit for a message or a log: credentials in a URI's user part are masked."""
    return re.sub(r"//[^/@]+@", "//***@", location)


class StorageError(RuntimeError):
    """A location cannot be used for the run; the message names it and says what to do."""


def absolute(location: str | Path) -> str:
    """``location`` as every node must name it: a URI as given (its ``?query`` kept: pyarrow takes
    options such as ``endpoint_override`` there), a path made absolute here."""
    text = str(location)
    if "://" in text and not text.startswith("file://"):
        base, sep, query = text.partition("?")
        return base.rstrip("/") + sep + query
    if text.startswith("file://"):
        text = text[len("file://") :]
    return os.path.abspath(os.path.expanduser(text))


class Storage:
    """Files under one location; names are relative, with ``/`` between parts."""

    def __init__(self, location: str | Path) -> None:
        self.location = absolute(location)
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(self.location)
        except (pa.ArrowInvalid, OSError, ValueError) as exc:  # ArrowInvalid: an unknown scheme
            raise StorageError(f"{shown(self.location)}: not a path or a URI pyarrow.fs understands: {exc}") from exc
        self.root = self.root.rstrip("/") or "/"

    @property
    def is_local(self) -> bool:
        """The files are on this node's file system (a shared mount when other nodes see them)."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, name: str = "") -> str:
        """The file system path of ``name`` (a local path when ``is_local``)."""
        return f"{self.root}/{name}" if name else self.root

    def child(self, name: str) -> Storage:
        base, sep, query = self.location.partition("?")
        return Storage(f"{base}/{name}{sep}{query}")

    def parent(self) -> tuple[Storage, str]:
        """The location holding this one, and this one's name in it."""
        base, sep, query = self.location.partition("?")
        head, name = base.rsplit("/", 1)
        return Storage(f"{head or '/'}{sep}{query}"), name

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound

    def read_text(self, name: str) -> str:
        try:
            with self.fs.open_input_stream(self.path(name)) as stream:
                return stream.read().decode()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StorageError(f"{shown(self.location)}: cannot read {name}: {exc}") from exc

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` whole: a temporary sibling first, then moved over it."""
        final = self.path(name)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if self.is_local:
            write_atomic(final, data)
            return
        tmp = f"{parent}/.{final.rsplit('/', 1)[1]}.{secrets.token_hex(4)}.tmp"
        with self.fs.open_output_stream(tmp) as stream:
            stream.write(data)
        self.fs.move(tmp, final)  # object stores: a whole-object copy, never a partial one

    def delete(self, name: str) -> None:
        info = self.fs.get_file_info(self.path(name))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(name))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(name))

    def move(self, source: str, target: str) -> None:
        """Rename ``source`` to ``target``, replacing it. A file is one move, and a local folder
        ``move_into_place``: ``target`` is always the old one or the new one. Object stores move
        single objects only, so a folder there is copied; the old one is moved aside first, and a
        crash midway leaves it as ``<target>.replaced.*``, not lost."""
        src, dst = self.path(source), self.path(target)
        if self.fs.get_file_info(src).type != pafs.FileType.Directory:
            self.fs.move(src, dst)
        elif self.is_local:
            move_into_place(Path(src), Path(dst))
        else:
            stale = f"{target}.replaced.{secrets.token_hex(4)}"
            if self.exists(target):
                self._copy_dir(target, stale)
            self._copy_dir(source, target)
            self.delete(stale)

    def _copy_dir(self, source: str, target: str) -> None:
        """An object store's folder move: copy every object, then delete the source."""
        pafs.copy_files(self.path(source), self.path(target), self.fs, self.fs)
        self.fs.delete_dir(self.path(source))

    def upload(self, local_dir: str | Path, name: str) -> None:
        """Copy the files of ``local_dir`` under ``name`` (remote locations only need this)."""
        self.fs.create_dir(self.path(name), recursive=True)
        pafs.copy_files(str(local_dir), self.path(name), pafs.LocalFileSystem(), self.fs)

    def download(self, name: str, local_dir: str | Path, keep: Callable[[str], bool] | None = None) -> None:
        """Copy the files under ``name`` (those whose relative path ``keep`` accepts) into ``local_dir``."""
        selector = pafs.FileSelector(self.path(name), recursive=True, allow_not_found=True)  # nothing yet: nothing to copy
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.File:
                continue
            relative = info.path[len(self.path(name)) + 1 :]
            if keep is not None and not keep(relative):
                continue
            target = Path(local_dir) / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, str(target), self.fs, pafs.LocalFileSystem())

    def staging_dir(self, name: str) -> Path:
        """A local folder to build ``name`` in before ``upload``: the location itself on a path."""
        if self.is_local:
            return Path(self.path(name))
        digest = hashlib.sha256(self.location.encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / "segr1-staging" / digest / name

    # ---- the start-up proof ---------------------------------------------------------------------

    def write_probe(self) -> tuple[str, str]:
        """Write a random token under a fresh name; returns (name, token) for ``check_probe``."""
        token = secrets.token_hex(16)
        name = PROBE_PREFIX + secrets.token_hex(6)
        try:
            self.write_text(name, token)
        except OSError as exc:
            raise StorageError(f"trainer.output_dir {shown(self.location)}: the driver cannot write there: {exc}") from exc
        return name, token

    def check_probe(self, name: str, token: str, who: str) -> None:
        """Raise StorageError unless ``name`` holds ``token`` as seen from here (``who``)."""
        try:
            seen = self.read_text(name)
        except (FileNotFoundError, StorageError) as exc:
            seen = f"nothing ({type(exc).__name__})"
        if seen != token:
            raise StorageError(
                f"trainer.output_dir {shown(self.location)}: {who} does not see the file the driver wrote there "
                f"({self.path(name)}: found {seen}). Checkpoints and the export must live where the driver "
                "and every learner rank reach the same files: put trainer.output_dir on a mount every node "
                "shares (NFS, EFS, Filestore), or use a URI pyarrow.fs understands (s3://bucket/run, gs://...)."
            )


def clear_local(path: str | Path) -> None:
    """Remove a local staging folder, whatever is in it."""
    shutil.rmtree(path, ignore_errors=True)
