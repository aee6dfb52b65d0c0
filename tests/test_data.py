"""Datasets as Parquet shards: layouts, prepare, bad input, atomic writes, synth and the reader."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segr1.data import (
    MANIFEST_NAME,
    DatasetError,
    Record,
    ShardReader,
    ShardWriter,
    decode_record,
    encode_record,
    main,
    make_scene,
    parse_layout_spec,
    parse_pair_spec,
    prepare_dataset,
    read_manifest,
    synth_records,
    write_synth,
)

REPO = Path(__file__).resolve().parents[1]


# -- fake datasets on disk -------------------------------------------------------------------


def _pixels(width: int, height: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth image (so JPEG keeps it close) and a rectangle mask, both deterministic."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = rng.uniform(30, 200, 3)
    image = base + 40 * np.stack([xs / width, ys / height, (xs + ys) / (width + height)], -1)
    mask = np.zeros((height, width), bool)
    x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    mask[y0 : y0 + height // 3, x0 : x0 + width // 3] = True
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _write_pair(
    image_dir: Path, mask_dir: Path | None, stem: str, size=(40, 30), seed=0, fmt="JPEG"
) -> tuple[np.ndarray, np.ndarray]:
    """Write `stem.jpg` (or .png) and `stem.png` like the public sets: mask grey 0/255."""
    image, mask = _pixels(*size, seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    suffix = ".jpg" if fmt == "JPEG" else ".png"
    Image.fromarray(image).save(image_dir / f"{stem}{suffix}", format=fmt, quality=95)
    if mask_dir is not None:
        mask_dir.mkdir(parents=True, exist_ok=True)
        grey = np.where(mask, 255, 0).astype(np.uint8)
        Image.fromarray(grey, mode="L").save(mask_dir / f"{stem}.png")
    with Image.open(image_dir / f"{stem}{suffix}") as img:
        return np.asarray(img.convert("RGB")), mask


def _make_layouts(root: Path) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Tiny copies of COD10K-v3, CAMO, DUTS and DIS5K in their real folder layouts."""
    made: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    def add(source: str, image_dir: Path, mask_dir: Path, stems: list[str], seed: int, size=(40, 30)):
        for i, stem in enumerate(stems):
            made.setdefault(source, {})[stem] = _write_pair(image_dir, mask_dir, stem, size, seed + i)

    cod = root / "COD10K-v3"
    add("COD10K-train", cod / "Train/Image", cod / "Train/GT_Object",
        ["COD10K-CAM-1-Aquatic-1-BatFish-1", "COD10K-CAM-2-Terrestrial-23-Cat-1"], 0)
    # Non-camouflaged images are left out by convention (and have no object mask here).
    _write_pair(cod / "Train/Image", None, "COD10K-NonCAM-1-Aquatic-1-Fish-1", seed=99)
    add("COD10K-test", cod / "Test/Image", cod / "Test/GT_Object", ["COD10K-CAM-3-Flying-53-Bird-3"], 10)
    camo = root / "CAMO-V.1.0-CVIU2019"
    add("CAMO-train", camo / "Images/Train", camo / "GT", ["camourflage_00001", "camourflage_00002"], 20)
    add("CAMO-test", camo / "Images/Test", camo / "GT", ["camourflage_00100"], 30)
    duts = root / "DUTS"
    add("DUTS-train", duts / "DUTS-TR/DUTS-TR-Image", duts / "DUTS-TR/DUTS-TR-Mask",
        ["ILSVRC2012_test_00000004", "n01440764_1234"], 40, size=(36, 48))
    dis = root / "DIS5K"
    add("DIS5K-train", dis / "DIS-TR/im", dis / "DIS-TR/gt", ["1#Accessories#1#Bag#1"], 50, size=(64, 40))
    for k in range(1, 5):
        add(f"DIS5K-test{k}", dis / f"DIS-TE{k}/im", dis / f"DIS-TE{k}/gt", [f"te{k}#a"], 60 + k)
    return made


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("raw")
    return root, _make_layouts(root)


def _read_all(path: Path) -> list[Record]:
    return list(ShardReader(path, shuffle=False, epochs=1))


def _resized(image: np.ndarray, mask: np.ndarray, size: tuple[int, int]):
    img = Image.fromarray(image).resize(size, Image.Resampling.BICUBIC)
    grey = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
    return np.asarray(img), np.asarray(grey) >= 128


# -- prepare ---------------------------------------------------------------------------------


def test_prepare_every_layout_resized(layouts, tmp_path: Path):
    root, made = layouts
    specs = [
        f"cod10k:{root}/COD10K-v3:train",
        f"cod10k:{root}/COD10K-v3:test",
        f"camo:{root}/CAMO-V.1.0-CVIU2019:train",
        f"camo:{root}:test",  # the root that holds the CAMO folder is accepted too
        f"duts:{root}/DUTS:train",
        f"dis5k:{root}/DIS5K:train",
        f"dis5k:{root}/DIS5K:test",
    ]
    sources = [src for spec in specs for src in parse_layout_spec(spec)]
    report = prepare_dataset(sources, tmp_path / "out", size=(32, 24), rows_per_shard=4)

    expected_counts = {source: len(pairs) for source, pairs in made.items()}
    assert report.counts == expected_counts
    assert report.excluded == {"COD10K-train": 1}
    manifest = read_manifest(tmp_path / "out")
    assert manifest["count"] == 13 and manifest["size"] == [32, 24]
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 4, 1]
    assert manifest["tasks"] == {"cod": 6, "sod": 2, "dis": 5}

    records = _read_all(tmp_path / "out")
    assert [r.id for r in records] == [f"{s}/{stem}" for s in made for stem in made[s]]
    for record in records:
        stem = record.id.split("/", 1)[1]
        image, mask = made[record.source][stem]
        want_image, want_mask = _resized(image, mask, (32, 24))
        assert record.image.shape == (24, 32, 3) and record.size == (32, 24)
        assert record.orig_size == (image.shape[1], image.shape[0])
        np.testing.assert_array_equal(record.mask, want_mask)
        # Re-encoded as JPEG q95: close to the resized source, not bit-equal.
        assert np.abs(record.image.astype(int) - want_image).mean() < 2.0
        assert record.texts == []
    task_of = {r.source: r.task for r in records}
    assert task_of["DUTS-train"] == "sod" and task_of["DIS5K-test3"] == "dis"
    assert task_of["CAMO-test"] == "cod"


def test_prepare_original_size_keeps_image_bytes(layouts, tmp_path: Path):
    root, made = layouts
    sources = parse_layout_spec(f"duts:{root}/DUTS/DUTS-TR:train")  # the split folder itself
    prepare_dataset(sources, tmp_path / "orig", size=None)
    table = pq.read_table(next((tmp_path / "orig").glob("*.parquet")))
    rows = table.to_pylist()
    image_dir = root / "DUTS/DUTS-TR/DUTS-TR-Image"
    for row in rows:
        stem = row["id"].split("/", 1)[1]
        assert row["image"] == (image_dir / f"{stem}.jpg").read_bytes()
        assert (row["width"], row["height"]) == (row["orig_width"], row["orig_height"]) == (36, 48)
        record = decode_record(row)
        np.testing.assert_array_equal(record.mask, made["DUTS-train"][stem][1])
        with Image.open(io.BytesIO(row["mask"])) as mask_png:
            assert mask_png.mode == "L" and set(np.unique(np.asarray(mask_png))) <= {0, 255}
    assert read_manifest(tmp_path / "orig")["resize"] is None


def test_pair_option_and_masks_binarised_at_128(tmp_path: Path):
    images, masks = tmp_path / "imgs", tmp_path / "gts"
    image, _ = _write_pair(images, None, "a", size=(20, 10), fmt="PNG")
    masks.mkdir()
    grey = np.tile(np.arange(0, 250, 12.5).astype(np.uint8), (10, 1))  # 0..237 across the width
    Image.fromarray(grey, mode="L").save(masks / "a.png")
    src = parse_pair_spec(f"{images}:{masks}:MySet:sod")
    assert (src.source, src.task) == ("MySet", "sod")
    prepare_dataset([src], tmp_path / "out", size=None)
    (record,) = _read_all(tmp_path / "out")
    np.testing.assert_array_equal(record.mask, grey >= 128)
    np.testing.assert_array_equal(record.image, image)  # PNG kept byte for byte: lossless
    assert record.id == "MySet/a" and record.task == "sod"
    assert parse_pair_spec(f"{images}:{masks}").source == tmp_path.name


@pytest.mark.parametrize("case", ["missing mask", "unreadable image", "size mismatch", "truncated"])
def test_bad_pair_stops_with_path_and_reason(case: str, tmp_path: Path):
    images, masks = tmp_path / "im", tmp_path / "gt"
    for i in range(3):
        _write_pair(images, masks, f"good{i}", seed=i)
    bad_image = images / "zbad.jpg"  # sorts last: three shards are on disk when it is reached
    _write_pair(images, masks, "zbad", seed=7)
    if case == "missing mask":
        (masks / "zbad.png").unlink()
        want_path, reason = bad_image, "missing mask"
    elif case == "unreadable image":
        bad_image.write_bytes(b"this is not a JPEG")
        want_path, reason = bad_image, "unreadable image"
    elif case == "truncated":
        bad_image.write_bytes(bad_image.read_bytes()[:300])
        want_path, reason = bad_image, "unreadable image"
    else:
        Image.new("L", (41, 30)).save(masks / "zbad.png")
        want_path, reason = masks / "zbad.png", "size mismatch"
    out = tmp_path / "out"
    src = parse_pair_spec(f"{images}:{masks}:X")
    with pytest.raises(DatasetError) as err:
        prepare_dataset([src], out, size=(16, 16), rows_per_shard=1)
    assert str(want_path) in str(err.value) and reason in str(err.value)
    assert list(out.iterdir()) == []  # the shards written before the bad pair are gone

    report = prepare_dataset([src], out, size=(16, 16), skip_bad=True, rows_per_shard=1)
    assert report.total == 3 and [b.kind for b in report.skipped] == [reason]
    assert f"skipped 1 bad pairs ({reason}: 1)" in report.summary()
    manifest = read_manifest(out)
    assert manifest["skipped"][0]["path"] == str(want_path)
    assert [r.id for r in _read_all(out)] == ["X/good0", "X/good1", "X/good2"]


def test_empty_and_missing_folders(tmp_path: Path):
    (tmp_path / "im").mkdir()
    (tmp_path / "gt").mkdir()
    (tmp_path / "im" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=f"{tmp_path / 'im'}: empty folder"):
        prepare_dataset([parse_pair_spec(f"{tmp_path}/im:{tmp_path}/gt")], tmp_path / "out")
    with pytest.raises(DatasetError, match=f"{tmp_path / 'nowhere'}: image folder"):
        prepare_dataset([parse_pair_spec(f"{tmp_path}/nowhere:{tmp_path}/gt")], tmp_path / "out")
    with pytest.raises(DatasetError, match="COD10K-v3 split folder not found"):
        parse_layout_spec(f"cod10k:{tmp_path}:train")
    with pytest.raises(DatasetError, match="unknown split 'val'"):
        parse_layout_spec(f"duts:{tmp_path}:val")


def test_cli_prepare_prints_counts_and_skip_bad(layouts, tmp_path: Path, capsys):
    root, _ = layouts
    images, masks = tmp_path / "im", tmp_path / "gt"
    _write_pair(images, masks, "ok")
    _write_pair(images, None, "lonely")
    _write_pair(images, masks, "broken")
    (images / "broken.jpg").write_bytes(b"\x00" * 10)
    argv = ["prepare", "--out", str(tmp_path / "d"), "--layout", f"camo:{root}/CAMO-V.1.0-CVIU2019:train",
            "--pair", f"{images}:{masks}:Extra", "--size", "24x16"]
    assert main(argv) == 1
    assert "broken.jpg: unreadable image" in capsys.readouterr().err
    assert main([*argv, "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "wrote 3 records in 1 shards" in out and "(24x16)" in out
    assert "CAMO-train  2" in out and "Extra       1" in out
    assert "skipped 2 bad pairs (missing mask: 1, unreadable image: 1)" in out
    # A finished dataset is not overwritten by accident.
    assert main([*argv, "--skip-bad"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--skip-bad", "--overwrite", "--size", "original"]) == 0
    assert read_manifest(tmp_path / "d")["resize"] is None


def test_workers_give_the_same_rows(layouts, tmp_path: Path):
    root, _ = layouts
    sources = parse_layout_spec(f"dis5k:{root}/DIS5K:test")
    prepare_dataset(sources, tmp_path / "one", size=(20, 20), workers=1)
    prepare_dataset(sources, tmp_path / "two", size=(20, 20), workers=2)
    tables = [pq.read_table(p) for p in sorted((tmp_path / "one").glob("*.parquet"))]
    tables2 = [pq.read_table(p) for p in sorted((tmp_path / "two").glob("*.parquet"))]
    assert [t.to_pylist() for t in tables] == [t.to_pylist() for t in tables2]


# -- writer ----------------------------------------------------------------------------------


def test_writer_publishes_by_rename_and_manifest_last(tmp_path: Path, monkeypatch):
    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src, dst):
        renames.append((Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_synth(tmp_path, count=5, size=16, rows_per_shard=2)
    assert renames == [
        ("part-00000.parquet.tmp", "part-00000.parquet"),
        ("part-00001.parquet.tmp", "part-00001.parquet"),
        ("part-00002.parquet.tmp", "part-00002.parquet"),
        (f".manifest.json.{os.getpid()}.tmp", "manifest.json"),  # segr1.core.files.write_atomic
    ]
    assert not list(tmp_path.glob("*.tmp"))


def test_writer_rejects_duplicates_and_aborts_cleanly(tmp_path: Path):
    record = next(synth_records(1, 16))
    with pytest.raises(DatasetError, match="duplicate record id"):
        with ShardWriter(tmp_path, rows_per_shard=1) as writer:
            writer.write(record)
            writer.write(encode_record(record))
    assert list(tmp_path.iterdir()) == []


def test_text_records_round_trip(tmp_path: Path):
    image, mask = _pixels(24, 16, 3)
    texts = ["the left cat", "cat on the left"]
    refer = Record("refcoco/1/7", "refcoco-val", "refer", image, mask, texts, (640, 427))
    query = ["what keeps rain off?"]
    reason = Record("reasonseg/3", "ReasonSeg-val", "reason", image, mask.astype(np.uint8), query)
    with ShardWriter(tmp_path) as writer:
        writer.write(refer)
        writer.write(reason)
    got = _read_all(tmp_path)
    assert [r.texts for r in got] == [["the left cat", "cat on the left"], ["what keeps rain off?"]]
    assert got[0].orig_size == (640, 427) and got[1].orig_size == (24, 16)
    np.testing.assert_array_equal(got[1].mask, mask)
    with pytest.raises(ValueError, match="needs at least one text"):
        Record("x", "s", "refer", image, mask)
    with pytest.raises(ValueError, match="carries no texts"):
        Record("x", "s", "cod", image, mask, ["a"])


# -- synth -----------------------------------------------------------------------------------


def test_synth_is_deterministic_and_prefix_stable():
    a = list(synth_records(6, 32, seed=3))
    b = list(synth_records(4, 32, seed=3))
    c = list(synth_records(6, 32, seed=4))
    for x, y in zip(a, b):
        assert x.id == y.id
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.mask, y.mask)
    assert all(not np.array_equal(x.image, z.image) for x, z in zip(a, c))
    assert {r.task for r in a} == {"cod"} and {r.source for r in a} == {"synthetic"}


@pytest.mark.parametrize("size", [16, 48, (64, 32), (16, 64), 256])
def test_synth_masks_are_exact_and_sized(size):
    shifts = []
    for seed in range(25 if size != 256 else 4):
        scene = make_scene(np.random.default_rng(seed), size)
        # Outside the mask every pixel is the background; inside, the object layer shows.
        np.testing.assert_array_equal(scene.image[~scene.mask], scene.background[~scene.mask])
        inside = np.abs(scene.image[scene.mask].astype(int) - scene.background[scene.mask]).mean()
        assert inside > 5.0
        assert 0.05 <= scene.mask.mean() <= 0.40
        inside_mean = scene.image[scene.mask].mean(0)
        shifts.append(np.abs(inside_mean - scene.image[~scene.mask].mean(0)).max())
    # Camouflaged, neither invisible nor trivial: object and background colours differ a little
    # on average (single small scenes vary with where the object falls on the texture).
    assert 8.0 < np.mean(shifts) < 40.0


@pytest.mark.parametrize("size", [16, (64, 32), 112])
def test_salient_scenes_split_at_one_brightness(size):
    for seed in range(25):
        scene = make_scene(np.random.default_rng(seed), size, kind="salient")
        brightness = scene.image.astype(float).mean(axis=2)
        # The dimmest object pixel outshines the brightest background pixel in every scene.
        assert brightness[scene.mask].min() > brightness[~scene.mask].max() + 10
        assert 0.05 <= scene.mask.mean() <= 0.40
    record = next(iter(synth_records(1, 16, seed=3, kind="salient")))
    assert (record.id, record.task) == ("synthetic-salient-3-0000000", "sod")


@pytest.mark.parametrize("kind", ["camouflage", "salient"])
def test_position_code_writes_brightness_column_and_row(kind):
    plain = make_scene(np.random.default_rng(7), (50, 30), kind=kind)
    coded = make_scene(np.random.default_rng(7), (50, 30), kind=kind, position_code=True)
    np.testing.assert_array_equal(coded.mask, plain.mask)  # same scene, only recoloured
    red = np.rint(plain.image.astype(float).mean(axis=2))
    np.testing.assert_array_equal(coded.image[..., 0], red)
    assert coded.image[0, :, 1].tolist() == np.rint(np.arange(50) * 255 / 49).tolist()  # green: the column
    assert coded.image[:, 0, 2].tolist() == np.rint(np.arange(30) * 255 / 29).tolist()  # blue: the row
    np.testing.assert_array_equal(coded.image[..., 1:], coded.background[..., 1:])  # whatever the scene
    assert next(iter(synth_records(1, 16, kind=kind, position_code=True))).id.endswith("-xy-0-0000000")


def test_synth_rejects_an_unknown_kind_before_writing(tmp_path: Path):
    with pytest.raises(ValueError, match="kind must be one of .*'zebra'"):
        write_synth(tmp_path / "syn", 3, 16, kind="zebra")
    assert not (tmp_path / "syn").exists()


def test_synth_cli_writes_a_dataset(tmp_path: Path):
    out = tmp_path / "syn"
    proc = subprocess.run(
        [sys.executable, "-m", "segr1.data", "synth", "--out", str(out), "--count", "5",
         "--size", "40", "--seed", "2", "--rows-per-shard", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 5 synthetic camouflage records (40x40, seed 2) in 3 shards" in proc.stdout
    stored = _read_all(out)
    for got, want in zip(stored, synth_records(5, 40, seed=2), strict=True):
        assert got.id == want.id
        np.testing.assert_array_equal(got.mask, want.mask)  # masks are lossless
        # JPEG q95 4:4:4 on sensor-like grain: about 3 grey levels.
        assert np.abs(got.image.astype(int) - want.image).mean() < 4.0


def test_synth_cli_writes_salient_position_coded_scenes(tmp_path: Path):
    out = tmp_path / "syn"
    code = main(["synth", "--out", str(out), "--count", "3", "--size", "32", "--kind", "salient",
                 "--position-code"])
    assert code == 0
    manifest = read_manifest(out)
    assert (manifest["kind"], manifest["position_code"], manifest["tasks"]) == ("salient", True, {"sod": 3})
    for got, want in zip(_read_all(out), synth_records(3, 32, kind="salient", position_code=True), strict=True):
        assert got.id == want.id
        np.testing.assert_array_equal(got.mask, want.mask)


# -- reader ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("syn")
    write_synth(out, count=10, size=16, seed=0, rows_per_shard=3)  # shards of 3, 3, 3, 1
    return out


def _ids(reader: ShardReader, n: int | None = None) -> list[str]:
    return [r.id for r in itertools.islice(reader, n)]


def test_reader_order_and_len(synth_dir: Path):
    stored = [f"synthetic-0-{i:07d}" for i in range(10)]
    assert len(ShardReader(synth_dir)) == 10
    assert _ids(ShardReader(synth_dir, shuffle=False, epochs=1)) == stored
    first = _ids(ShardReader(synth_dir, seed=5, epochs=1))
    assert first == _ids(ShardReader(synth_dir, seed=5, epochs=1))
    assert sorted(first) == stored and first != stored
    assert first != _ids(ShardReader(synth_dir, seed=6, epochs=1))
    two = _ids(ShardReader(synth_dir, seed=5, epochs=2))
    assert two[:10] == first and sorted(two[10:]) == stored and two[10:] != first
    forever = ShardReader(synth_dir, seed=5)
    assert _ids(forever, 25)[20:] == _ids(ShardReader(synth_dir, seed=5, epochs=3))[20:25]
    assert forever.state_dict() == {"epoch": 2, "position": 5, "seed": 5}
    assert len(_ids(ShardReader(synth_dir / "part-00003.parquet", epochs=1))) == 1


@pytest.mark.parametrize("cut", [0, 1, 3, 4, 9, 10, 13, 20])
def test_reader_save_and_resume_equals_uninterrupted(synth_dir: Path, cut: int):
    full = list(ShardReader(synth_dir, seed=11, epochs=2))
    first = ShardReader(synth_dir, seed=11, epochs=2)
    before = list(itertools.islice(first, cut))
    state = json.loads(json.dumps(first.state_dict()))
    resumed = ShardReader(synth_dir, seed=0, epochs=2)  # the saved seed wins
    resumed.load_state_dict(state)
    after = list(resumed)
    assert [r.id for r in before + after] == [r.id for r in full]
    for got, want in zip(before + after, full):
        np.testing.assert_array_equal(got.image, want.image)
        np.testing.assert_array_equal(got.mask, want.mask)


def test_reader_names_a_bad_shard(synth_dir: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in synth_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "part-00002.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(DatasetError, match="part-00002.parquet: unreadable shard"):
        list(ShardReader(copy, shuffle=False, epochs=1))
    (copy / MANIFEST_NAME).unlink()
    with pytest.raises(DatasetError, match="no manifest"):
        ShardReader(copy)
