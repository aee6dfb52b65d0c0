"""RefCOCO, RefCOCO+ and RefCOCOg: every referring expression of a split, with its object's mask.

The `refer` toolkit ships each dataset as `instances.json` (COCO format: images, and annotations
with polygon or RLE segmentations) plus `refs(unc).p` / `refs(umd).p`, a Python pickle. Pickles are
never loaded here (unpickling runs code from the file); this loader reads the same refs as JSON:

    ROOT/instances.json
    ROOT/refs.json            (or refs(unc).json for RefCOCO/RefCOCO+, refs(umd).json for RefCOCOg)
        [{"ref_id": 0, "ann_id": 1719310, "image_id": 581857, "split": "testA",
          "sentences": [{"sent": "the lady with the blue shirt"}, ...]}, ...]

Converting a pickle you trust is one line: `python -c "import json, pickle;
json.dump(pickle.load(open('refs(unc).p', 'rb')), open('refs(unc).json', 'w'))"`.
Images are COCO train2014 files named by `file_name` in `instances.json`, in `--coco-images` or
one of ROOT/images, ROOT/train2014, ROOT/../images/mscoco/images/train2014 (LISA's layout).
Each sentence is one example; cIoU sums over all of them, as the papers report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segr1.data.records import DatasetError
from segr1.evaluation.datasets import Benchmark, Example, Sample, read_json, read_rgb
from segr1.evaluation.masks import AnnotationError, check_coco_segmentation, coco_segmentation_to_mask

INSTANCES_FILE = "instances.json"
REFS_FILES = {
    "refcoco": ("refs.json", "refs(unc).json"),
    "refcoco+": ("refs.json", "refs(unc).json"),
    "refcocog": ("refs.json", "refs(umd).json"),
}


@dataclass(frozen=True)
class CocoObject:
    """An image file and one annotation's segmentation; the mask is drawn when loaded."""

    image: Path
    height: int
    width: int
    segmentation: Any

    def load(self) -> Sample:
        image = read_rgb(self.image)
        if image.shape[:2] != (self.height, self.width):
            raise DatasetError(
                f"{self.image}: image is {image.shape[1]}x{image.shape[0]}, instances.json says "
                f"{self.width}x{self.height}"
            )
        return Sample(image, coco_segmentation_to_mask(self.segmentation, self.height, self.width))


def find_refs_file(name: str, root: Path) -> Path:
    for candidate in REFS_FILES[name]:
        if (root / candidate).is_file():
            return root / candidate
    pickles = sorted(p.name for p in root.glob("refs*.p"))
    hint = (
        f" ({', '.join(pickles)} found: pickles are not read; convert it to JSON once, see docs/eval.md)"
        if pickles
        else ""
    )
    raise DatasetError(f"{root}: no refs file ({' or '.join(REFS_FILES[name])}){hint}")


def find_image_dir(root: Path, given: Path | None) -> Path:
    if given is not None:
        if not given.is_dir():
            raise DatasetError(f"{given}: COCO image folder (--coco-images) not found")
        return given
    candidates = [
        root / "images",
        root / "train2014",
        root.parent / "images" / "mscoco" / "images" / "train2014",
    ]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise DatasetError(
        f"{root}: COCO train2014 images not found in {', '.join(map(str, candidates))}; pass --coco-images"
    )


def _index(instances: Any, path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """Images and annotations by id."""
    if not isinstance(instances, dict):
        raise DatasetError(f"{path}: expected a COCO object with 'images' and 'annotations'")
    tables = {}
    for field in ("images", "annotations"):
        rows = instances.get(field)
        if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("id"), int) for r in rows):
            raise DatasetError(f"{path}: '{field}' must be a list of objects with an integer 'id'")
        tables[field] = {r["id"]: r for r in rows}
    return tables["images"], tables["annotations"]


def _image_entry(image: dict, path: Path) -> tuple[str, int, int]:
    file_name, height, width = image.get("file_name"), image.get("height"), image.get("width")
    if not isinstance(file_name, str) or not isinstance(height, int) or not isinstance(width, int):
        raise DatasetError(f"{path}: image {image['id']} needs file_name, height and width")
    if Path(file_name).is_absolute() or ".." in Path(file_name).parts:
        raise DatasetError(f"{path}: image {image['id']} file_name {file_name!r} leaves the image folder")
    return file_name, height, width


def _sentences(ref: dict, refs_path: Path) -> list[str]:
    sentences = ref.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise DatasetError(f"{refs_path}: ref {ref.get('ref_id')} has no sentences")
    texts = []
    for sentence in sentences:
        text = sentence.get("sent") if isinstance(sentence, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{refs_path}: ref {ref.get('ref_id')} has a sentence without 'sent' text")
        texts.append(text.strip())
    return texts


def _check_ref(ref: Any, refs_path: Path) -> None:
    if not isinstance(ref, dict):
        raise DatasetError(f"{refs_path}: every ref must be an object, got {type(ref).__name__}")
    for field in ("ref_id", "ann_id", "image_id"):
        if not isinstance(ref.get(field), int):
            raise DatasetError(f"{refs_path}: ref {ref.get('ref_id')!r} lacks an integer '{field}'")
    if not isinstance(ref.get("split"), str):
        raise DatasetError(f"{refs_path}: ref {ref['ref_id']} lacks a 'split'")


def refcoco_examples(name: str, root: Path, split: str, image_dir: Path) -> list[Example]:
    """Every sentence of every ref of `split`, checked: annotations, images and files exist."""
    instances_path, refs_path = root / INSTANCES_FILE, find_refs_file(name, root)
    if not instances_path.is_file():
        raise DatasetError(f"{instances_path}: not found")
    images, annotations = _index(read_json(instances_path), instances_path)
    refs = read_json(refs_path)
    if not isinstance(refs, list):
        raise DatasetError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    for ref in refs:
        _check_ref(ref, refs_path)
    chosen = [r for r in refs if r["split"] == split]
    if not chosen:
        found = sorted({r["split"] for r in refs})
        raise DatasetError(f"{refs_path}: no refs in split {split!r} (splits present: {', '.join(found)})")

    examples: list[Example] = []
    checked_files: set[Path] = set()
    seen_refs: set[int] = set()
    for ref in chosen:
        ref_id, ann_id, image_id = ref["ref_id"], ref["ann_id"], ref["image_id"]
        if ref_id in seen_refs:
            raise DatasetError(f"{refs_path}: ref_id {ref_id} appears twice in split {split!r}")
        seen_refs.add(ref_id)
        ann = annotations.get(ann_id)
        if ann is None:
            raise DatasetError(f"{refs_path}: ref {ref_id} names annotation {ann_id}, absent from {instances_path}")
        if ann.get("image_id") != image_id:
            raise DatasetError(
                f"{refs_path}: ref {ref_id} says image {image_id}, annotation {ann_id} says {ann.get('image_id')}"
            )
        if image_id not in images:
            raise DatasetError(f"{refs_path}: ref {ref_id} names image {image_id}, absent from {instances_path}")
        file_name, height, width = _image_entry(images[image_id], instances_path)
        try:
            check_coco_segmentation(ann.get("segmentation"), height, width)
        except AnnotationError as err:
            raise DatasetError(f"{instances_path}: annotation {ann_id}: {err}") from err
        image_path = image_dir / file_name
        if image_path not in checked_files:
            if not image_path.is_file():
                raise DatasetError(f"{image_path}: image of ref {ref_id} not found")
            checked_files.add(image_path)
        source = CocoObject(image_path, height, width, ann["segmentation"])
        for index, text in enumerate(_sentences(ref, refs_path)):
            examples.append(Example(f"{ref_id}-{index}", "refer", text, source))
    return examples


def refcoco_benchmark(
    name: str, key: str, title: str, root: Path, split: str, spec: str, coco_images: Path | None
) -> Benchmark:
    if not root.is_dir():
        raise DatasetError(f"{root}: {title} folder not found")
    examples = refcoco_examples(name, root, split, find_image_dir(root, coco_images))
    return Benchmark(key, title, "refer", spec, len(examples), lambda: iter(examples))
