"""A run's storage: paths made absolute, ``file://`` URIs, and an S3 bucket (moto's S3 server on
loopback, spoken to by pyarrow's own S3 client: the remote code path, staging and uploads included).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from learner import checkpoint as ckpt
from segr1.runtime.storage import Storage, StorageError, absolute


def test_a_relative_path_names_one_absolute_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute("runs/cod") == str(tmp_path / "runs" / "cod")
    assert absolute(f"file://{tmp_path}/x") == str(tmp_path / "x")
    assert absolute("s3://bucket/run/?endpoint_override=h:1") == "s3://bucket/run?endpoint_override=h:1"
    storage = Storage("runs/cod")
    assert storage.is_local and storage.child("checkpoints").location == str(tmp_path / "runs/cod/checkpoints")


def test_text_files_are_replaced_whole_and_probes_name_the_location(tmp_path):
    storage = Storage(tmp_path / "run")
    storage.write_text("a/b.txt", "one")
    storage.write_text("a/b.txt", "two")
    assert storage.read_text("a/b.txt") == "two"
    assert sorted(os.listdir(tmp_path / "run" / "a")) == ["b.txt"]  # no temporary file left behind
    name, token = storage.write_probe()
    storage.check_probe(name, token, who="rank 0")
    with pytest.raises(StorageError, match=rf"trainer.output_dir {tmp_path / 'elsewhere'}: rank 3 does not see"):
        Storage(tmp_path / "elsewhere").check_probe(name, token, who="rank 3")


def test_s3_storage_stages_uploads_and_publishes_checkpoints(s3_uri, tmp_path):
    root = Storage(s3_uri).child("checkpoints")
    assert not root.is_local and "endpoint_override" in root.location
    for rank in (0, 1):  # each rank stages its own files, then uploads them into step_1.tmp
        local = root.staging_dir(f"{ckpt.tmp_name('step_1')}.rank{rank}")
        (local / ckpt.DEEPSPEED_TAG).mkdir(parents=True)
        (local / ckpt.DEEPSPEED_TAG / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(bytes([rank]) * 10)
        (local / f"rng_rank{rank}.json").write_text("{}")
        root.upload(local, ckpt.tmp_name("step_1"))
    assert ckpt.latest(root) is None
    ckpt.publish(root, "step_1", {"step": 1})
    assert ckpt.latest(root) == "step_1" and not root.exists(ckpt.tmp_name("step_1"))
    assert ckpt.read_client_state(root, "step_1") == {"step": 1}
    got = tmp_path / "rank1"
    root.download("step_1", got, keep=lambda rel: ckpt.rank_needs(rel, 1))
    files = sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file())
    assert files == ["client_state.json", "deepspeed/zero_pp_rank_1_optim_states.pt", "rng_rank1.json"]
    assert (got / "deepspeed" / "zero_pp_rank_1_optim_states.pt").read_bytes() == bytes([1]) * 10


def test_s3_probe_is_seen_and_a_wrong_bucket_is_named(s3_uri):
    storage = Storage(s3_uri)
    name, token = storage.write_probe()
    storage.check_probe(name, token, who="learner rank 0")
    other = Storage(s3_uri.replace("segr1-test/run", "segr1-test/other"))
    with pytest.raises(StorageError, match="learner rank 1 does not see the file the driver wrote"):
        other.check_probe(name, token, who="learner rank 1")
    storage.delete(name)
    assert not storage.exists(name)


def test_a_job_location_with_a_bad_scheme_is_refused():
    with pytest.raises(StorageError, match="nosuch://x: not a path or a URI"):
        Storage("nosuch://x")


def test_staging_folders_are_per_location(tmp_path):
    a = Storage("s3://bucket/a?endpoint_override=127.0.0.1:1").staging_dir("x")
    b = Storage("s3://bucket/b?endpoint_override=127.0.0.1:1").staging_dir("x")
    assert a != b and a.name == b.name == "x"
    assert Storage(tmp_path).staging_dir("x") == Path(tmp_path / "x")  # a path is written in place


@pytest.mark.parametrize("where", ["local", "s3"])
def test_publishing_a_step_again_replaces_its_folder_whole(where, tmp_path, request):
    """A resumed run saves the step it resumed from again: the new folder must replace the old
    one (no file of the old left beside the new), on a path and on an object store."""
    location = tmp_path / "ckpt" if where == "local" else request.getfixturevalue("s3_uri")
    root = Storage(location).child("checkpoints")
    for attempt, files in ((1, ["old.pt", "both.pt"]), (2, ["both.pt"])):
        tmp = ckpt.tmp_name("step_1")
        for name in files:
            root.write_bytes(f"{tmp}/{ckpt.DEEPSPEED_TAG}/{name}", bytes([attempt]))
        ckpt.publish(root, "step_1", {"attempt": attempt})
    assert ckpt.read_client_state(root, "step_1") == {"attempt": 2}
    with root.fs.open_input_stream(root.path(f"step_1/{ckpt.DEEPSPEED_TAG}/both.pt")) as stream:
        assert stream.read() == bytes([2])
    assert not root.exists(f"step_1/{ckpt.DEEPSPEED_TAG}/old.pt")
    listing = root.fs.get_file_info(pafs.FileSelector(root.path(""), recursive=False))
    assert sorted(Path(info.path).name for info in listing) == ["latest", "step_1"]  # nothing aside left
