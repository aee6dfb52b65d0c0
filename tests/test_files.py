"""The one atomic file writer and the one folder publisher (segr1.core.files)."""

from __future__ import annotations

import pytest

from segr1.core.files import move_into_place, write_atomic


def test_write_atomic_replaces_whole_and_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    write_atomic(path, "old\n")
    write_atomic(path, b"new\n")
    assert path.read_text() == "new\n"
    with pytest.raises(TypeError):
        write_atomic(path, 42)  # type: ignore[arg-type]  # fails after the temporary file exists
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary file left


def _folder(path, text):
    path.mkdir()
    (path / "weights").write_text(text)
    return path


def test_move_into_place_replaces_keeps_or_restores(tmp_path):
    final = tmp_path / "export"
    assert move_into_place(_folder(tmp_path / ".a", "v1"), final)
    assert move_into_place(_folder(tmp_path / ".b", "v2"), final)
    assert (final / "weights").read_text() == "v2"
    # Another process built the same cache entry first: its folder stays, ours goes.
    assert not move_into_place(_folder(tmp_path / ".c", "v3"), final, replace=False)
    assert (final / "weights").read_text() == "v2"
    # A rename that fails half way puts the old folder back.
    with pytest.raises(OSError):
        move_into_place(tmp_path / ".missing", final)
    assert (final / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
