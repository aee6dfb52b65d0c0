"""Evaluation: benchmark loaders on small stand-ins in each dataset's real on-disk format, metrics
recomputed from the saved masks against numbers computed by hand (numpy IoU; pysodmetrics, the
reference implementation, for the COD/SOD measures), resume after a crash, bad input, the
report and the gallery. The slow test runs the real Ray path with the tiny Qwen2.5-VL and SAM2.
"""

from __future__ import annotations

import json
import re
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import py_sod_metrics as reference
import pytest
from PIL import Image

from segr1.config import EvalSettings
from segr1.core.prompts import answer_text
from segr1.core.segment import BoxSegmenter
from segr1.data.records import DatasetError
from segr1.evaluation import JobOptions, LoadOptions, ResultStore, parse_benchmark, run_job
from segr1.evaluation.gallery import pick_cases
from segr1.evaluation.masks import AnnotationError, coco_rle_to_mask, rle_counts_from_string
from segr1.evaluation.reasonseg import Shape, rasterise_shapes
from segr1.evaluation.results import RECORDS_FILE, EvalError, EvalResult, read_mask_png
from segr1.evaluation.scoring import evaluate_benchmark, local_predictor

POLICY = 64  # policy image side in these tests
GARBAGE = "I cannot see <bbox>[1, 2, three]</bbox> anything"


# --------------------------------------------------------------------------- helpers


def _write_image(path: Path, width: int, height: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _write_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path)


def _rect(h: int, w: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[rows, cols] = True
    return mask


def _box_answer(box: list[float]) -> str:
    # Label 0 points carve nothing in BoxSegmenter, so the predicted mask is exactly the box.
    return answer_text(boxes=[box], points=[[box[0], box[1]]], labels=[0], think="the object is there")


def _box_mask(box: list[float], h: int, w: int) -> np.ndarray:
    """BoxSegmenter's mask for a policy-space box on an h x w image, worked out by hand: the box
    is scaled by (w / POLICY, h / POLICY) and covers columns floor(x1)..ceil(x2) (exclusive)."""
    sx, sy = w / POLICY, h / POLICY
    x1, y1, x2, y2 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
    return _rect(h, w, slice(int(np.floor(y1)), int(np.ceil(y2))), slice(int(np.floor(x1)), int(np.ceil(x2))))


def _run(benchmark, out: Path, completions: dict[str, str], **evaluation):
    """The job without Ray: completions looked up by example id, decoded by BoxSegmenter."""
    calls: list[str] = []

    def complete(example, image):
        assert image.shape == (POLICY, POLICY, 3)  # the policy sees the resized image
        calls.append(example.id)
        return completions[example.id]

    predictor = local_predictor(complete, BoxSegmenter(point_radius=3.0))
    settings = EvalSettings(policy_size=POLICY, **evaluation)
    options = JobOptions(out_dir=out, settings={"policy": "hand"}, evaluation=settings, progress=False)
    outcome = run_job([benchmark], options, lambda: nullcontext(predictor))
    return outcome, calls


def _pysod(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    sm, em, wfm, mae = reference.Smeasure(), reference.Emeasure(), reference.WeightedFmeasure(), reference.MAE()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = reference.Fmeasure()
    for pred, gt in pairs:
        for metric in (sm, em, wfm, mae, fm):
            metric.step(np.where(pred, 255, 0).astype(np.uint8), np.where(gt, 255, 0).astype(np.uint8))
    e, f = em.get_results()["em"], fm.get_results()["fm"]
    return {
        "Sm": sm.get_results()["sm"], "wFm": wfm.get_results()["wfm"], "MAE": mae.get_results()["mae"],
        "meanEm": e["curve"].mean(), "maxEm": e["curve"].max(), "adpEm": e["adp"],
        "meanFm": f["curve"].mean(), "maxFm": f["curve"].max(), "adpFm": f["adp"],
    }


# --------------------------------------------------------------------------- COD/SOD folders

COD_IMAGES = {  # stem: (width, height, gt, completion box or None for an unparseable answer)
    "COD10K-CAM-1-Aquatic-1-BatFish-1": (128, 96, (slice(20, 60), slice(30, 90)), [8, 8, 40, 40]),
    "COD10K-CAM-2-Terrestrial-23-Cat-2": (96, 64, (slice(10, 50), slice(5, 70)), [0, 10, 60, 50]),
    "COD10K-CAM-3-Flying-55-Owl-3": (80, 80, (slice(30, 70), slice(25, 55)), None),
}


@pytest.fixture
def cod10k(tmp_path: Path) -> Path:
    """COD10K-v3's test layout: Test/Image/*.jpg + Test/GT_Object/*.png, one NonCAM image."""
    root = tmp_path / "COD10K-v3"
    for i, (stem, (w, h, (rows, cols), _)) in enumerate(COD_IMAGES.items()):
        _write_image(root / "Test" / "Image" / f"{stem}.jpg", w, h, seed=i)
        _write_mask(root / "Test" / "GT_Object" / f"{stem}.png", _rect(h, w, rows, cols))
    _write_image(root / "Test" / "Image" / "COD10K-NonCAM-5-Background-1-X-4.jpg", 40, 40, seed=9)
    _write_mask(root / "Test" / "GT_Object" / "COD10K-NonCAM-5-Background-1-X-4.png", np.zeros((40, 40), bool))
    return root


def _cod_completions() -> dict[str, str]:
    return {stem: (GARBAGE if box is None else _box_answer(box)) for stem, (*_, box) in COD_IMAGES.items()}


def test_cod10k_metrics_equal_pysodmetrics_on_saved_masks(cod10k: Path, tmp_path: Path):
    bench = parse_benchmark(f"cod10k-test:{cod10k}")
    assert bench.count == 3 and bench.task == "cod"  # NonCAM left out, as the benchmark does
    outcome, calls = _run(bench, tmp_path / "out", _cod_completions())
    assert sorted(calls) == sorted(COD_IMAGES)

    store = ResultStore(tmp_path / "out" / "cod10k-test", {"policy": "hand", "benchmark": "cod10k-test",
                                                           "task": "cod", "policy_size": POLICY})
    pairs = []
    for stem, (w, h, (rows, cols), box) in COD_IMAGES.items():
        expected = np.zeros((h, w), bool) if box is None else _box_mask(box, h, w)
        saved = read_mask_png(store.masks_dir / store.done[stem].mask)
        np.testing.assert_array_equal(saved, expected)
        pairs.append((expected, _rect(h, w, rows, cols)))
    score = outcome.scores[0]
    hand = _pysod(pairs)
    for key, value in hand.items():
        assert score.metrics[key] == pytest.approx(float(value), abs=1e-6), key
    hand_mae = np.mean([np.mean(p != g) for p, g in pairs])
    assert score.metrics["MAE"] == pytest.approx(hand_mae, abs=1e-12)
    # The unparseable answer is an empty mask, counted, not the previous image's mask.
    assert (score.empty, score.format_errors, score.count) == (1, 1, 3)
    report = json.loads(outcome.results_json.read_text())["benchmarks"][0]
    assert report["paper"] == {"Sm": 0.873} and report["empty"] == 1
    md = outcome.results_md.read_text()
    assert re.search(r"\| COD10K-test \| 3 \| [0-9.]+ \| 0\.873 \|", md)


def test_sod_folder_layouts_are_found(tmp_path: Path):
    """ECSSD's release (images/ + ground_truth_mask/) and a benchmark pack (DUT-OMRON/Imgs + GT)."""
    ecssd = tmp_path / "ECSSD"
    _write_image(ecssd / "images" / "0001.jpg", 40, 30, 0)
    _write_mask(ecssd / "ground_truth_mask" / "0001.png", _rect(30, 40, slice(5, 20), slice(5, 30)))
    bench = parse_benchmark(f"ecssd:{ecssd}")
    assert (bench.key, bench.task, bench.count) == ("ecssd", "sod", 1)
    sample = next(bench.examples()).load()
    assert sample.image.shape == (30, 40, 3) and sample.gt.sum() == 15 * 25

    pack = tmp_path / "pack"
    _write_image(pack / "DUT-OMRON" / "Imgs" / "a.jpg", 20, 20, 1)
    _write_mask(pack / "DUT-OMRON" / "GT" / "a.png", np.ones((20, 20), bool))
    assert parse_benchmark(f"dut-omron:{pack}").count == 1


def test_prepared_shards_as_benchmarks(tmp_path: Path):
    """A prepared dataset stands in for a folder layout; a text record gives one example per text."""
    from segr1.data import Record, ShardWriter, synth_record

    cod_dir = tmp_path / "camo-shards"
    records = [synth_record(i, size=(72, 48), seed=5) for i in range(2)]
    with ShardWriter(cod_dir) as writer:
        for record in records:
            writer.write(record)
    bench = parse_benchmark(f"camo-test:{cod_dir}")
    assert (bench.key, bench.task, bench.count, bench.notes) == ("camo-test", "cod", 2, ())
    box = [8, 8, 40, 40]
    outcome, _ = _run(bench, tmp_path / "out", {r.id: _box_answer(box) for r in records})
    hand = _pysod([(_box_mask(box, 48, 72), r.mask) for r in records])
    for key, value in hand.items():
        assert outcome.scores[0].metrics[key] == pytest.approx(float(value), abs=1e-6), key

    text_dir = tmp_path / "refer-shards"
    image = np.zeros((32, 32, 3), np.uint8)
    with ShardWriter(text_dir) as writer:
        gt = _rect(32, 32, slice(0, 8), slice(0, 8))
        writer.write(Record("r1", "mine", "refer", image, gt, ["a cat", "the cat"]))
    refer = parse_benchmark(f"shards:{text_dir}")
    assert refer.task == "refer"
    assert [(e.id, e.expression) for e in refer.examples()] == [("r1#0", "a cat"), ("r1#1", "the cat")]


# --------------------------------------------------------------------------- RefCOCO


def _coco_rle_string(mask: np.ndarray) -> str:
    """COCO's compressed RLE of a mask, written out here from the format's definition."""
    flat = mask.T.reshape(-1)
    counts, current, run = [], False, 0
    for value in flat:
        if bool(value) != current:
            counts.append(run)
            current, run = bool(value), 0
        run += 1
    counts.append(run)
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = not ((c & 0x10 == 0 and x == 0) or (c & 0x10 and x == -1))
            chars.append(chr(c + 48 + (0x20 if more else 0)))
    return "".join(chars)


REF_H, REF_W = 60, 80


@pytest.fixture
def refcoco(tmp_path: Path) -> Path:
    """refer's layout: instances.json (COCO) + refs(unc).json, images in ROOT/images."""
    root = tmp_path / "refcoco"
    _write_image(root / "images" / "COCO_train2014_000000000001.jpg", REF_W, REF_H, 1)
    _write_image(root / "images" / "COCO_train2014_000000000002.jpg", REF_W, REF_H, 2)
    blob = _rect(REF_H, REF_W, slice(30, 50), slice(40, 70))
    instances = {
        "images": [
            {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": REF_H, "width": REF_W},
            {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": REF_H, "width": REF_W},
        ],
        "annotations": [
            # a rectangle polygon: Pillow fills it with its outline, rows 10..29 and columns 20..49
            {"id": 11, "image_id": 1, "segmentation": [[20, 10, 49, 10, 49, 29, 20, 29]]},
            {"id": 12, "image_id": 1, "segmentation": {"size": [REF_H, REF_W], "counts": _coco_rle_string(blob)}},
            {"id": 21, "image_id": 2, "segmentation": {"size": [REF_H, REF_W],
                                                        "counts": [REF_H * 5, REF_H * 10, REF_H * (REF_W - 15)]}},
        ],
    }
    refs = [
        {"ref_id": 0, "ann_id": 11, "image_id": 1, "split": "val",
         "sentences": [{"sent": "left thing"}, {"sent": "the upper object"}]},
        {"ref_id": 1, "ann_id": 12, "image_id": 1, "split": "val", "sentences": [{"sent": "lower right blob"}]},
        {"ref_id": 2, "ann_id": 21, "image_id": 2, "split": "val", "sentences": [{"sent": "a stripe"}]},
        {"ref_id": 3, "ann_id": 21, "image_id": 2, "split": "testA", "sentences": [{"sent": "other split"}]},
    ]
    (root / "instances.json").write_text(json.dumps(instances))
    (root / "refs(unc).json").write_text(json.dumps(refs))
    return root


REF_GT = {
    "0": _rect(REF_H, REF_W, slice(10, 30), slice(20, 50)),
    "1": _rect(REF_H, REF_W, slice(30, 50), slice(40, 70)),
    "2": _rect(REF_H, REF_W, slice(0, REF_H), slice(5, 15)),
}
REF_ANSWERS = {  # example id: box in policy pixels (64 x 64 for an 80 x 60 image), None = garbage
    "0-0": [16, 16, 40, 32],
    "0-1": [0, 0, 64, 64],
    "1-0": None,
    "2-0": [4, 0, 12, 64],
}


def test_refcoco_every_expression_ciou_giou_by_hand(refcoco: Path, tmp_path: Path):
    bench = parse_benchmark(f"refcoco:{refcoco}:val")
    examples = list(bench.examples())
    assert [e.id for e in examples] == ["0-0", "0-1", "1-0", "2-0"]  # every sentence, val only
    assert examples[1].expression == "the upper object"
    for example in examples:  # polygon, compressed RLE and uncompressed RLE give the masks drawn by hand
        np.testing.assert_array_equal(example.load().gt, REF_GT[example.id.split("-")[0]])

    completions = {k: GARBAGE if box is None else _box_answer(box) for k, box in REF_ANSWERS.items()}
    outcome, _ = _run(bench, tmp_path / "out", completions)
    inters, unions, ious = [], [], []
    for key, box in REF_ANSWERS.items():
        pred = np.zeros((REF_H, REF_W), bool) if box is None else _box_mask(box, REF_H, REF_W)
        gt = REF_GT[key.split("-")[0]]
        inters.append(np.sum(pred & gt))
        unions.append(np.sum(pred | gt))
        ious.append(inters[-1] / unions[-1])
    score = outcome.scores[0]
    assert score.metrics["cIoU"] == pytest.approx(sum(inters) / sum(unions), abs=1e-12)
    assert score.metrics["gIoU"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert (score.count, score.empty) == (4, 1)
    md = outcome.results_md.read_text()
    assert re.search(r"\| RefCOCO val \| 4 \| [0-9.]+ \| 74\.3 \|", md)


def test_coco_rle_decoding_matches_pycocotools_vectors():
    # A 10x10 mask pycocotools encodes as "]12810Oh0", i.e. runs [45, 2, 8, 3, 8, 2, 32].
    assert rle_counts_from_string("]12810Oh0") == [45, 2, 8, 3, 8, 2, 32]
    mask = coco_rle_to_mask({"size": [10, 10], "counts": "]12810Oh0"}, 10, 10)
    expected = np.zeros((10, 10), bool)
    expected[5:7, 4] = expected[5:8, 5] = expected[6:8, 6] = True  # column-major runs
    np.testing.assert_array_equal(mask, expected)
    assert _coco_rle_string(expected) == "]12810Oh0"  # the fixtures' encoder agrees with pycocotools
    with pytest.raises(AnnotationError, match="sum to"):
        coco_rle_to_mask({"size": [10, 10], "counts": [10, 5]}, 10, 10)


# --------------------------------------------------------------------------- ReasonSeg


@pytest.fixture
def reasonseg(tmp_path: Path) -> Path:
    """LISA's layout: ReasonSeg/val/<name>.jpg with <name>.json beside it."""
    folder = tmp_path / "ReasonSeg" / "val"
    _write_image(folder / "kitchen.jpg", 50, 40, 3)
    shapes = [
        {"label": "target", "points": [[10, 5], [39, 5], [39, 24], [10, 24]], "shape_type": "polygon"},
        {"label": "ignore", "points": [[20.7, 10.2], [29.9, 10], [29, 14], [20, 14]], "shape_type": "polygon"},
        {"label": "flag", "points": [[0, 0]], "shape_type": "polygon"},
    ]
    (folder / "kitchen.json").write_text(json.dumps(
        {"text": ["What holds the soup?", "Which one is hot?"], "is_sentence": True, "shapes": shapes}))
    _write_image(folder / "garden.jpg", 40, 40, 4)
    (folder / "garden.json").write_text(json.dumps(
        {"text": ["Where could a bird sit?"], "shapes": [
            {"label": "target", "points": [[0, 20], [39, 20], [39, 39], [0, 39]]}]}))
    return tmp_path / "ReasonSeg"


def test_reasonseg_ignore_regions_and_giou_by_hand(reasonseg: Path, tmp_path: Path):
    bench = parse_benchmark(f"reasonseg:{reasonseg}:val")
    examples = {e.id: e for e in bench.examples()}
    assert set(examples) == {"kitchen", "garden"}  # LISA's protocol: the first query per image
    assert examples["kitchen"].expression == "What holds the soup?"
    kitchen = examples["kitchen"].load()
    target = _rect(40, 50, slice(5, 25), slice(10, 40))
    ignore = _rect(40, 50, slice(10, 15), slice(20, 30))  # vertices truncated to int, outline included
    np.testing.assert_array_equal(kitchen.ignore, ignore)
    np.testing.assert_array_equal(kitchen.gt, target & ~ignore)  # drawn after (smaller), it wins

    answers = {"kitchen": [0, 0, 32, 64], "garden": None}  # left part of the kitchen image; garbage
    completions = {k: GARBAGE if b is None else _box_answer(b) for k, b in answers.items()}
    outcome, _ = _run(bench, tmp_path / "out", completions)
    pred_k = _box_mask(answers["kitchen"], 40, 50) & ~ignore
    gt_k = target & ~ignore
    inter_k, union_k = np.sum(pred_k & gt_k), np.sum(pred_k | gt_k)
    gt_g = _rect(40, 40, slice(20, 40), slice(0, 40))
    inter_g, union_g = 0, gt_g.sum()  # empty prediction
    score = outcome.scores[0]
    assert score.metrics["gIoU"] == pytest.approx((inter_k / union_k + 0.0) / 2, abs=1e-12)
    assert score.metrics["cIoU"] == pytest.approx((inter_k + inter_g) / (union_k + union_g), abs=1e-12)
    md = outcome.results_md.read_text()
    assert re.search(r"\| ReasonSeg val \| 2 \| [0-9.]+ \| 60\.8 \|", md)

    all_texts = parse_benchmark(f"reasonseg:{reasonseg}:val", LoadOptions(reason_texts="all"))
    assert sorted(e.id for e in all_texts.examples()) == ["garden#0", "kitchen#0", "kitchen#1"]


def test_reasonseg_small_target_inside_ignore_wins():
    big_ignore = Shape("ignore", ((0, 0), (19, 0), (19, 19), (0, 19)))
    small_target = Shape("target", ((5, 5), (9, 5), (9, 9), (5, 9)))
    gt, ignore = rasterise_shapes([small_target, big_ignore], 20, 20)
    assert gt.sum() == 25 and ignore.sum() == 400 - 25


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_file_before_any_work(cod10k: Path, refcoco: Path, reasonseg: Path, tmp_path: Path):
    (refcoco / "instances.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match=re.escape(str(refcoco / "instances.json"))):
        parse_benchmark(f"refcoco:{refcoco}:val")

    missing = cod10k / "Test" / "GT_Object" / "COD10K-CAM-1-Aquatic-1-BatFish-1.png"
    missing.unlink()
    with pytest.raises(DatasetError, match="BatFish-1"):
        parse_benchmark(f"cod10k-test:{cod10k}")

    (reasonseg / "val" / "garden.jpg").unlink()
    with pytest.raises(DatasetError, match=re.escape(str(reasonseg / "val" / "garden.json"))):
        parse_benchmark(f"reasonseg:{reasonseg}:val")

    bad_shapes = tmp_path / "rs" / "val"
    _write_image(bad_shapes / "a.jpg", 10, 10, 0)
    (bad_shapes / "a.json").write_text(json.dumps({"text": ["q"], "shapes": [{"label": "target", "points": "x"}]}))
    with pytest.raises(DatasetError, match=r"a\.json: shape 0"):
        parse_benchmark(f"reasonseg:{tmp_path / 'rs'}:val")


def test_refcoco_missing_image_and_pickle_only(refcoco: Path):
    (refcoco / "images" / "COCO_train2014_000000000002.jpg").unlink()
    with pytest.raises(DatasetError, match="COCO_train2014_000000000002.jpg: image of ref 2 not found"):
        parse_benchmark(f"refcoco:{refcoco}:val")
    (refcoco / "refs(unc).json").rename(refcoco / "refs(unc).p")
    with pytest.raises(DatasetError, match=r"pickles are not read"):
        parse_benchmark(f"refcoco:{refcoco}:val")


def test_cli_stops_on_bad_annotation_before_starting_anything(refcoco: Path, tmp_path: Path, capsys):
    from segr1.eval import main

    (refcoco / "refs(unc).json").write_text(json.dumps([{"ref_id": 0, "split": "val"}]))
    out = tmp_path / "out"
    status = main(["--policy", str(tmp_path / "no-such-model"), "--sam2-checkpoint", "tiny",
                   "--benchmark", f"refcoco:{refcoco}:val", "--out", str(out)])
    assert status == 1
    err = capsys.readouterr().err
    assert str(refcoco / "refs(unc).json") in err and "ann_id" in err
    assert not out.exists()


# --------------------------------------------------------------------------- resume


def test_resume_after_a_crash_skips_finished_examples(cod10k: Path, tmp_path: Path):
    bench = parse_benchmark(f"cod10k-test:{cod10k}")
    completions = _cod_completions()
    settings = {"policy": "hand", "benchmark": bench.key, "task": "cod", "policy_size": POLICY}
    out = tmp_path / "out"

    calls: list[str] = []

    def crashing(example, image):
        if len(calls) == 2:
            raise RuntimeError("node lost")
        calls.append(example.id)
        return completions[example.id]

    store = ResultStore(out / bench.key, settings)
    with pytest.raises(RuntimeError, match="node lost"):
        evaluate_benchmark(bench, store, local_predictor(crashing, BoxSegmenter(point_radius=4.0)), POLICY)
    lines = (out / bench.key / RECORDS_FILE).read_text().splitlines()
    assert len(lines) == 2
    # The crash also tore a third line half way.
    with (out / bench.key / RECORDS_FILE).open("a") as f:
        f.write('{"id": "COD10K-CAM-3-Fly')

    resumed = ResultStore(out / bench.key, settings)
    assert set(resumed.done) == set(calls)
    outcome, later = _run(bench, out, completions)
    assert later == [s for s in COD_IMAGES if s not in calls]  # only the unfinished one
    fresh, _ = _run(bench, tmp_path / "fresh", completions)
    assert outcome.scores[0].metrics == pytest.approx(fresh.scores[0].metrics, abs=1e-12)
    assert len((out / bench.key / RECORDS_FILE).read_text().splitlines()) == 3

    with pytest.raises(EvalError, match="policy_size"):
        ResultStore(out / bench.key, {**settings, "policy_size": 128})


def test_limit_scores_only_the_first_examples(cod10k: Path, tmp_path: Path):
    bench = parse_benchmark(f"cod10k-test:{cod10k}")
    outcome, calls = _run(bench, tmp_path / "out", _cod_completions(), limit=2)
    assert len(calls) == 2 and outcome.scores[0].count == 2


# --------------------------------------------------------------------------- gallery


def test_gallery_shows_best_and_worst_with_escaped_text(refcoco: Path, tmp_path: Path):
    bench = parse_benchmark(f"refcoco:{refcoco}:val")
    completions = {k: GARBAGE if b is None else _box_answer(b) for k, b in REF_ANSWERS.items()}
    completions["1-0"] = "<script>alert(1)</script>"
    outcome, _ = _run(bench, tmp_path / "out", completions, gallery=1)
    page = outcome.gallery.read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    pictures = re.findall(r'<img src="([^"]+)"', page)
    assert len(pictures) == 2  # best 1 and worst 1
    for rel in pictures:
        with Image.open(outcome.gallery.parent / rel) as img:
            assert img.height == 192 and img.width > 3 * 192  # three panels side by side

    results = [EvalResult(str(i), "m.png", None, "", False, True, [], [], [], [], [64, 64], [8, 8], i, 10)
               for i in range(5)]
    best, worst = pick_cases(results, 2)
    assert [r.id for r in best] == ["4", "3"] and [r.id for r in worst] == ["0", "1"]


# --------------------------------------------------------------------------- the Ray path


@pytest.mark.slow
def test_ray_run_with_tiny_models_counts_empty_masks_and_resumes(
    ray_cluster, tiny_qwen_dir, tiny_sam2, cod10k: Path, refcoco: Path, tmp_path: Path
):
    """The real path: vLLM rollout actor + SAM2 reward actor over the tiny random models. Most
    random completions do not parse: those must be empty masks, counted; the metrics must equal
    the ones computed by hand from the saved PNGs; a second run must redo nothing."""
    from segr1.core.parser import parse_completion
    from segr1.eval import main

    out = tmp_path / "out"
    argv = [
        "--policy", "tiny", "--sam2-checkpoint", "tiny", "--out", str(out),
        "--benchmark", f"cod10k-test:{cod10k}", "--benchmark", f"refcoco:{refcoco}:val",
        "--policy-size", "56", "--max-tokens", "24", "--dtype", "float32", "--max-model-len", "1024",
        "--kv-cache-mb", "128", "--prompts-per-call", "2", "--gallery", "2", "--no-progress",
    ]
    assert main(argv) == 0
    report = {b["key"]: b for b in json.loads((out / "results.json").read_text())["benchmarks"]}

    # COD10K: the saved masks, at each image's size, against the GT files, through pysodmetrics.
    cod_records = [json.loads(x) for x in (out / "cod10k-test" / RECORDS_FILE).read_text().splitlines()]
    assert sorted(r["id"] for r in cod_records) == sorted(COD_IMAGES)
    pairs = []
    for r in cod_records:
        w, h, (rows, cols), _ = COD_IMAGES[r["id"]]
        pred = read_mask_png(out / "cod10k-test" / "masks" / r["mask"])
        assert pred.shape == (h, w)
        parsed = parse_completion(r["completion"], (56, 56))
        assert r["empty"] == parsed.is_empty
        if r["empty"]:
            assert not pred.any()
        pairs.append((pred, _rect(h, w, rows, cols)))
    cod = report["cod10k-test"]
    assert cod["count"] == 3 and cod["empty"] == sum(r["empty"] for r in cod_records)
    assert cod["format_errors"] == sum(not r["format_ok"] for r in cod_records)
    for key, value in _pysod(pairs).items():
        assert cod["metrics"][key] == pytest.approx(float(value), abs=1e-6), key

    # RefCOCO: every expression, cIoU and gIoU by hand from the saved masks.
    ref_records = [json.loads(x) for x in (out / "refcoco-val" / RECORDS_FILE).read_text().splitlines()]
    assert sorted(r["id"] for r in ref_records) == sorted(REF_ANSWERS)
    inter = union = 0
    ious = []
    for r in ref_records:
        pred = read_mask_png(out / "refcoco-val" / "masks" / r["mask"])
        gt = REF_GT[r["id"].split("-")[0]]
        i, u = int(np.sum(pred & gt)), int(np.sum(pred | gt))
        assert (r["intersection"], r["union"]) == (i, u)
        inter, union = inter + i, union + u
        ious.append(i / u)
    ref = report["refcoco-val"]
    assert ref["count"] == 4 and ref["empty"] == sum(r["empty"] for r in ref_records)
    assert ref["metrics"]["cIoU"] == pytest.approx(inter / union, abs=1e-12)
    assert ref["metrics"]["gIoU"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert (out / "gallery" / "index.html").is_file()

    before = {k: (out / k / RECORDS_FILE).read_bytes() for k in ("cod10k-test", "refcoco-val")}
    assert main(argv) == 0  # everything is done: no actor starts, nothing is redone
    assert {k: (out / k / RECORDS_FILE).read_bytes() for k in before} == before
    again = {b["key"]: b["metrics"] for b in json.loads((out / "results.json").read_text())["benchmarks"]}
    assert again == {k: v["metrics"] for k, v in report.items()}
