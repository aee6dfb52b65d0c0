"""The evaluation benchmarks: what `--benchmark NAME:PATH[:SPLIT]` means and how examples load.

A `Benchmark` is built from a spec and checked at once: every folder listed, every annotation file
parsed, every image and mask file found. A missing or malformed file raises `DatasetError` naming
it, before any model is started. Pixels load lazily, one example at a time (`Example.load`),
always at the image's original size, because the metrics compare against the ground truth as the
dataset ships it.

Foreground benchmarks (COD/SOD) read image/mask folders through `segr1.data.layouts` or prepared
Parquet shards; RefCOCO/+/g and ReasonSeg live in `refcoco.py` and `reasonseg.py`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from segr1.core.prompts import TEXT_TASKS
from segr1.data.layouts import PairSource, list_pairs, parse_pair_spec, resolve_layout
from segr1.data.reader import ShardReader
from segr1.data.records import DatasetError, binarise_mask
from segr1.data.shards import MANIFEST_NAME, read_manifest

FOREGROUND_TASKS = ("cod", "sod")
EVAL_TASKS = FOREGROUND_TASKS + TEXT_TASKS


@dataclass
class Sample:
    """One example's pixels at original size: RGB image, bool ground truth and, for ReasonSeg,
    the bool mask of pixels that the metrics leave out ("ignore" regions)."""

    image: np.ndarray
    gt: np.ndarray
    ignore: np.ndarray | None = None


class ExampleSource(Protocol):
    def load(self) -> Sample: ...


@dataclass(frozen=True)
class Example:
    """One evaluated item: an image (and expression, for text tasks) with its ground truth.
    `id` is unique within its benchmark and stable across runs (the resume key)."""

    id: str
    task: str
    expression: str | None
    source: ExampleSource

    def load(self) -> Sample:
        return self.source.load()


@dataclass
class Benchmark:
    """A checked benchmark: its examples are known (or, for shards, counted) up front."""

    key: str  # directory-safe name, e.g. "refcoco-testA"
    title: str  # as the paper writes it, e.g. "RefCOCO testA"
    task: str
    spec: str
    count: int
    _examples: Callable[[], Iterator[Example]]
    notes: tuple[str, ...] = ()

    def examples(self) -> Iterator[Example]:
        return self._examples()


def read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 HxWx3 RGB; any decoder failure names the file."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as err:  # noqa: BLE001 - image decoders raise many exception types
        raise DatasetError(f"{path}: unreadable image: {type(err).__name__}: {err}") from err


def read_json(path: Path) -> Any:
    """A JSON annotation file; unreadable or invalid JSON names the file."""
    try:
        with path.open("rb") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: unreadable JSON: {err}") from err


@dataclass(frozen=True)
class FilePair:
    """An image file and its ground-truth mask file (grey level >= 128 is object)."""

    image: Path
    mask: Path

    def load(self) -> Sample:
        image = read_rgb(self.image)
        try:
            with Image.open(self.mask) as img:
                gt = binarise_mask(img)
        except Exception as err:  # noqa: BLE001
            raise DatasetError(f"{self.mask}: unreadable mask: {type(err).__name__}: {err}") from err
        if gt.shape != image.shape[:2]:
            raise DatasetError(
                f"{self.mask}: mask is {gt.shape[1]}x{gt.shape[0]}, image {self.image} is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        return Sample(image, gt)


@dataclass(frozen=True)
class InMemory:
    """A decoded shard record."""

    image: np.ndarray
    gt: np.ndarray

    def load(self) -> Sample:
        return Sample(self.image, self.gt)


# --- Folder layouts ---------------------------------------------------------------------------

# Image and ground-truth folder names of the usual releases and of the common benchmark packs,
# tried in order, case-insensitively, in ROOT and in ROOT/<dataset name>.
_GENERIC_FOLDERS = (("Imgs", "GT"), ("Image", "GT"), ("Images", "GT"), ("images", "masks"), ("im", "gt"))
_FOLDERS = {
    "nc4k": (("Imgs", "GT"), ("Image", "GT_Object")),
    "dut-omron": (("DUT-OMRON-image", "pixelwiseGT-new-PNG"), ("DUT-OMRON-image", "DUT-OMRON-mask")),
    "hku-is": (("imgs", "gt"),),
    "ecssd": (("images", "ground_truth_mask"),),
}
_DIR_NAMES = {"nc4k": "NC4K", "dut-omron": "DUT-OMRON", "hku-is": "HKU-IS", "ecssd": "ECSSD"}


def _subdir(base: Path, name: str) -> Path | None:
    exact = base / name
    if exact.is_dir():
        return exact
    if not base.is_dir():
        return None
    return next((p for p in sorted(base.iterdir()) if p.is_dir() and p.name.lower() == name.lower()), None)


def folder_candidates(name: str) -> tuple[tuple[str, str], ...]:
    """The (image folder, ground-truth folder) names tried for a folder-only benchmark."""
    return _FOLDERS[name] + _GENERIC_FOLDERS


def find_folder_pair(name: str, root: Path) -> tuple[Path, Path]:
    """The first (image dir, mask dir) of `folder_candidates(name)` found under `root`."""
    bases = [root] + [b for b in (_subdir(root, _DIR_NAMES[name]),) if b is not None]
    for base in bases:
        for image_name, mask_name in folder_candidates(name):
            image_dir, mask_dir = _subdir(base, image_name), _subdir(base, mask_name)
            if image_dir is not None and mask_dir is not None:
                return image_dir, mask_dir
    tried = ", ".join(f"{i}/+{m}/" for i, m in folder_candidates(name))
    raise DatasetError(f"{root}: no {_DIR_NAMES[name]} image and ground-truth folders found (tried {tried})")


def _pair_examples(sources: list[PairSource], task: str) -> list[Example]:
    """Every image with its mask; a missing mask stops the run here, naming the file."""
    examples: list[Example] = []
    for src in sources:
        pairs, _excluded = list_pairs(src)
        for pair in pairs:
            if pair.mask is None:
                raise DatasetError(f"{pair.image}: no ground truth {src.mask_dir / (pair.stem + '.png')}")
            examples.append(Example(pair.stem, task, None, FilePair(pair.image, pair.mask)))
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{sources[0].image_dir}: two images share a name across the benchmark's folders")
    return examples


def _listed(key: str, title: str, task: str, spec: str, examples: list[Example]) -> Benchmark:
    return Benchmark(key, title, task, spec, len(examples), lambda: iter(examples))


# --- Prepared shards --------------------------------------------------------------------------


def is_shard_path(path: Path) -> bool:
    return (path.is_dir() and (path / MANIFEST_NAME).is_file()) or (path.is_file() and path.suffix == ".parquet")


def _shard_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [path / s["file"] for s in read_manifest(path)["shards"]]


def _shard_columns(file: Path) -> dict[str, list]:
    columns = ["task", "texts", "width", "height", "orig_width", "orig_height"]
    try:
        return pq.read_table(file, columns=columns).to_pydict()
    except (OSError, pa.ArrowException) as err:
        raise DatasetError(f"{file}: unreadable shard: {err}") from err


def shard_benchmark(key: str, title: str, task: str | None, path: Path, spec: str) -> Benchmark:
    """Records of a prepared dataset; a text record gives one example per text. `task` None takes
    the records' own task, which must be one evaluation task throughout."""
    ShardReader(path, shuffle=False)  # checks the manifest and shard list now
    tasks: set[str] = set()
    records = texts = resized = 0
    for file in _shard_files(path):
        columns = _shard_columns(file)
        tasks.update(columns["task"])
        records += len(columns["task"])
        texts += sum(len(t) for t in columns["texts"])
        sizes = zip(columns["width"], columns["height"], columns["orig_width"], columns["orig_height"])
        resized += sum((w, h) != (ow, oh) for w, h, ow, oh in sizes)
    if task is None:
        if len(tasks) != 1 or not tasks <= set(EVAL_TASKS):
            raise DatasetError(f"{path}: records must share one task of {EVAL_TASKS}, found {sorted(tasks)}")
        task = next(iter(tasks))
    allowed = {task} if task in TEXT_TASKS else {*FOREGROUND_TASKS, "dis"}
    if not tasks <= allowed:
        wanted = "/".join(sorted(allowed))
        raise DatasetError(f"{path}: a {task} benchmark needs {wanted} records, found {sorted(tasks)}")
    notes = []
    if resized:
        notes.append(
            f"{resized} records were resized when prepared; metrics compare against the resized ground "
            "truth (prepare with --size original for numbers comparable to the paper)"
        )
    count = texts if task in TEXT_TASKS else records

    def examples() -> Iterator[Example]:
        for record in ShardReader(path, shuffle=False, epochs=1):  # default repeats forever
            source = InMemory(record.image, record.mask)
            if task in TEXT_TASKS:
                for index, text in enumerate(record.texts):
                    yield Example(f"{record.id}#{index}", task, text, source)
            else:
                yield Example(record.id, task, None, source)

    return Benchmark(key, title, task, spec, count, examples, tuple(notes))


# --- The registry -----------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadOptions:
    """Settings some loaders need: where the COCO train2014 images are (RefCOCO/+/g; None looks
    in the usual places), and whether ReasonSeg evaluates each image's first query (LISA's
    protocol) or all of them."""

    coco_images: Path | None = None
    reason_texts: str = "first"

    def __post_init__(self) -> None:
        if self.reason_texts not in ("first", "all"):
            raise ValueError(f"reason_texts must be 'first' or 'all', got {self.reason_texts!r}")


Build = Callable[[str, Path, "str | None", str, LoadOptions], Benchmark]  # name, root, split, spec


@dataclass(frozen=True)
class Kind:
    """A benchmark name: its title, task, splits (None: no split part) and how to build it."""

    title: str
    task: str
    splits: tuple[str, ...] | None
    build: Build


def benchmark_names(name: str, split: str | None) -> tuple[str, str]:
    """(key, title): `refcoco`, `testA` -> ("refcoco-testA", "RefCOCO testA")."""
    title = KINDS[name].title
    return (name, title) if split is None else (f"{name}-{split}", f"{title} {split}")


def _layout_kind(layout: str, split: str) -> Build:
    def build(name: str, root: Path, _split: str | None, spec: str, _options: LoadOptions) -> Benchmark:
        key, title = benchmark_names(name, None)
        task = KINDS[name].task
        if is_shard_path(root):
            return shard_benchmark(key, title, task, root, spec)
        return _listed(key, title, task, spec, _pair_examples(resolve_layout(layout, root, split), task))

    return build


def _folder_kind(name: str, root: Path, _split: str | None, spec: str, _options: LoadOptions) -> Benchmark:
    key, title = benchmark_names(name, None)
    task = KINDS[name].task
    if is_shard_path(root):
        return shard_benchmark(key, title, task, root, spec)
    if not root.is_dir():
        raise DatasetError(f"{root}: {title} folder not found")
    image_dir, mask_dir = find_folder_pair(name, root)
    source = PairSource(image_dir=image_dir, mask_dir=mask_dir, source=title, task=task)
    return _listed(key, title, task, spec, _pair_examples([source], task))


def _refer_kind(name: str, root: Path, split: str | None, spec: str, options: LoadOptions) -> Benchmark:
    from segr1.evaluation.refcoco import refcoco_benchmark

    key, title = benchmark_names(name, split)
    return refcoco_benchmark(name, key, title, root, split or "", spec, options.coco_images)


def _reason_kind(name: str, root: Path, split: str | None, spec: str, options: LoadOptions) -> Benchmark:
    from segr1.evaluation.reasonseg import reasonseg_benchmark

    key, title = benchmark_names(name, split)
    return reasonseg_benchmark(key, title, root, split or "", spec, options.reason_texts)


KINDS: dict[str, Kind] = {
    "cod10k-test": Kind("COD10K-test", "cod", None, _layout_kind("cod10k", "test")),
    "camo-test": Kind("CAMO-test", "cod", None, _layout_kind("camo", "test")),
    "nc4k": Kind("NC4K", "cod", None, _folder_kind),
    "duts-te": Kind("DUTS-TE", "sod", None, _layout_kind("duts", "test")),
    "dut-omron": Kind("DUT-OMRON", "sod", None, _folder_kind),
    "hku-is": Kind("HKU-IS", "sod", None, _folder_kind),
    "ecssd": Kind("ECSSD", "sod", None, _folder_kind),
    "refcoco": Kind("RefCOCO", "refer", ("val", "testA", "testB"), _refer_kind),
    "refcoco+": Kind("RefCOCO+", "refer", ("val", "testA", "testB"), _refer_kind),
    "refcocog": Kind("RefCOCOg", "refer", ("val", "test"), _refer_kind),
    "reasonseg": Kind("ReasonSeg", "reason", ("val", "test"), _reason_kind),
}
GENERIC = ("pairs", "shards")


def _generic(name: str, rest: str, spec: str) -> Benchmark:
    if name == "pairs":
        src = parse_pair_spec(rest)
        if src.task not in FOREGROUND_TASKS:
            raise DatasetError(f"--benchmark {spec!r}: folder pairs are foreground tasks {FOREGROUND_TASKS}")
        return _listed(f"pairs-{src.source}", src.source, src.task, spec, _pair_examples([src], src.task))
    path_text, sep, task = rest.rpartition(":")
    path, task_or_none = (Path(path_text), task) if sep and task in EVAL_TASKS else (Path(rest), None)
    path = path.expanduser()
    if not is_shard_path(path):
        raise DatasetError(f"{path}: not a prepared dataset (no {MANIFEST_NAME}, not a .parquet file)")
    return shard_benchmark(f"shards-{path.stem or path.name}", path.name, task_or_none, path, spec)


def parse_benchmark(spec: str, options: LoadOptions | None = None) -> Benchmark:
    """`NAME:PATH` for COD/SOD, `NAME:PATH:SPLIT` for RefCOCO/+/g and ReasonSeg,
    `pairs:IMAGE_DIR:MASK_DIR[:SOURCE[:TASK]]` and `shards:PATH[:TASK]` for anything prepared.
    PATH may contain ':'. Raises `DatasetError` naming the file or folder at fault."""
    name, sep, rest = spec.partition(":")
    name = name.lower()
    known = ", ".join([*KINDS, *GENERIC])
    if not sep or not rest:
        raise DatasetError(f"--benchmark {spec!r}: expected NAME:PATH[:SPLIT]; names: {known}")
    if name in GENERIC:
        return _generic(name, rest, spec)
    if name not in KINDS:
        raise DatasetError(f"--benchmark {spec!r}: unknown name {name!r}; known: {known}")
    kind = KINDS[name]
    split = None
    if kind.splits is not None:
        rest, sep, split = rest.rpartition(":")
        wanted = {s.lower(): s for s in kind.splits}
        if not sep or not rest or split.lower() not in wanted:
            raise DatasetError(f"--benchmark {spec!r}: {name} needs a split, one of {', '.join(kind.splits)}")
        split = wanted[split.lower()]
    return kind.build(name, Path(rest).expanduser(), split, spec, options or LoadOptions())
