"""Where the public benchmarks keep their images and ground truth, and how images pair with masks.

Each layout turns `NAME:ROOT:SPLIT` into one or more `PairSource`s (an image folder, a mask folder,
the source name and task). Pairing is by file stem: `name.jpg` pairs with `name.png`. Folder names
are matched without regard to case, because copies of these datasets differ in it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from segr1.data.records import TASKS, DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MASK_SUFFIX = ".png"


@dataclass(frozen=True)
class PairSource:
    """One image folder and its ground-truth folder. Images whose name contains `exclude` are left
    out on purpose (COD10K's non-camouflaged images) and counted, not treated as errors."""

    image_dir: Path
    mask_dir: Path
    source: str
    task: str
    exclude: str | None = None


@dataclass(frozen=True)
class Pair:
    stem: str
    image: Path
    mask: Path | None  # None: no ground truth with this stem


def _child(base: Path, *names: str) -> Path | None:
    """`base/names[0]/names[1]/...`, each part matched case-insensitively; None if absent."""
    path = base
    for name in names:
        exact = path / name
        if exact.is_dir():
            path = exact
            continue
        if not path.is_dir():
            return None
        matches = [p for p in path.iterdir() if p.is_dir() and p.name.lower() == name.lower()]
        if not matches:
            return None
        path = matches[0]
    return path


def _require(base: Path, *names: str, what: str) -> Path:
    found = _child(base, *names)
    if found is None:
        raise DatasetError(f"{base.joinpath(*names)}: {what} folder not found")
    return found


def _cod10k(root: Path, split: str) -> list[PairSource]:
    part = _require(root, split.capitalize(), what="COD10K-v3 split")
    return [
        PairSource(
            image_dir=_require(part, "Image", what="COD10K-v3 image"),
            mask_dir=_require(part, "GT_Object", what="COD10K-v3 object ground-truth"),
            source=f"COD10K-{split}",
            task="cod",
            # The COD benchmark (and Seg-R1) uses the camouflaged images only: 3040 train, 2026 test.
            exclude="NonCAM",
        )
    ]


def _camo_base(root: Path) -> Path:
    """CAMO ships as `Images/{Train,Test}` + `GT`; archives often wrap it in one more folder
    (`CAMO-V.1.0-CVIU2019/`), and the CAMO-COCO release puts it in `Camouflage/`."""

    def is_camo(base: Path) -> bool:
        return _child(base, "Images") is not None and _child(base, "GT") is not None

    for base in (root, root / "Camouflage"):
        if is_camo(base):
            return base
    found = [
        base
        for sub in sorted(p for p in root.iterdir() if p.is_dir())
        for base in (sub, sub / "Camouflage")
        if is_camo(base)
    ]
    if len(found) == 1:
        return found[0]
    if found:
        raise DatasetError(f"{root}: several CAMO copies ({', '.join(map(str, found))}); name one")
    raise DatasetError(f"{root}: no CAMO layout (Images/Train, Images/Test and GT) found")


def _camo(root: Path, split: str) -> list[PairSource]:
    base = _camo_base(root)
    gt = _require(base, "GT", what="CAMO ground-truth")
    # Most copies keep all 1250 masks in one GT folder; some split it like the images.
    gt = _child(gt, split.capitalize()) or gt
    return [
        PairSource(
            image_dir=_require(base, "Images", split.capitalize(), what="CAMO image"),
            mask_dir=gt,
            source=f"CAMO-{split}",
            task="cod",
        )
    ]


def _duts(root: Path, split: str) -> list[PairSource]:
    tag = {"train": "DUTS-TR", "test": "DUTS-TE"}[split]
    # ROOT may be the DUTS folder that holds DUTS-TR and DUTS-TE, or DUTS-TR/DUTS-TE itself.
    part = root if root.name.upper() == tag else _require(root, tag, what="DUTS split")
    return [
        PairSource(
            image_dir=_require(part, f"{tag}-Image", what="DUTS image"),
            mask_dir=_require(part, f"{tag}-Mask", what="DUTS mask"),
            source=f"DUTS-{split}",
            task="sod",
        )
    ]


_DIS_PARTS = {
    "train": ["DIS-TR"],
    "val": ["DIS-VD"],
    "test1": ["DIS-TE1"],
    "test2": ["DIS-TE2"],
    "test3": ["DIS-TE3"],
    "test4": ["DIS-TE4"],
    "test": ["DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4"],
}
_DIS_SOURCE = {"DIS-TR": "train", "DIS-VD": "val"} | {f"DIS-TE{i}": f"test{i}" for i in range(1, 5)}


def _dis5k(root: Path, split: str) -> list[PairSource]:
    sources = []
    for part_name in _DIS_PARTS[split]:
        part = _require(root, part_name, what="DIS5K split")
        sources.append(
            PairSource(
                image_dir=_require(part, "im", what="DIS5K image"),
                mask_dir=_require(part, "gt", what="DIS5K ground-truth"),
                source=f"DIS5K-{_DIS_SOURCE[part_name]}",
                task="dis",
            )
        )
    return sources


LAYOUTS: dict[str, tuple[tuple[str, ...], Callable[[Path, str], list[PairSource]]]] = {
    "cod10k": (("train", "test"), _cod10k),
    "camo": (("train", "test"), _camo),
    "duts": (("train", "test"), _duts),
    "dis5k": (tuple(_DIS_PARTS), _dis5k),
}


def resolve_layout(name: str, root: str | Path, split: str) -> list[PairSource]:
    """The folders of one split of a known dataset; errors name the folder that is missing."""
    key = name.lower()
    if key not in LAYOUTS:
        raise DatasetError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
    splits, resolve = LAYOUTS[key]
    if split.lower() not in splits:
        raise DatasetError(f"layout {key}: unknown split {split!r}; known: {', '.join(splits)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: {key} root folder not found")
    return resolve(root, split.lower())


def parse_layout_spec(spec: str) -> list[PairSource]:
    """`NAME:ROOT:SPLIT`, e.g. `cod10k:/data/COD10K-v3:train` (ROOT may itself contain ':')."""
    name, sep, rest = spec.partition(":")
    root, sep2, split = rest.rpartition(":")
    if not sep or not sep2 or not name or not root or not split:
        raise DatasetError(f"--layout {spec!r}: expected NAME:ROOT:SPLIT")
    return resolve_layout(name, root, split)


def parse_pair_spec(spec: str) -> PairSource:
    """`IMAGE_DIR:MASK_DIR[:SOURCE[:TASK]]`; SOURCE defaults to the image folder's parent's name
    (`.../CAMO/Imgs` -> `CAMO`), TASK to `cod`."""
    parts = spec.split(":")
    if not 2 <= len(parts) <= 4 or not all(parts):
        raise DatasetError(f"--pair {spec!r}: expected IMAGE_DIR:MASK_DIR[:SOURCE[:TASK]]")
    image_dir, mask_dir = Path(parts[0]).expanduser(), Path(parts[1]).expanduser()
    source = parts[2] if len(parts) > 2 else (image_dir.resolve().parent.name or image_dir.name)
    task = parts[3] if len(parts) > 3 else "cod"
    if task not in TASKS:
        raise DatasetError(f"--pair {spec!r}: task {task!r} is not one of {TASKS}")
    return PairSource(image_dir=image_dir, mask_dir=mask_dir, source=source, task=task)


def _files(directory: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
    )


def list_pairs(src: PairSource) -> tuple[list[Pair], int]:
    """The image/mask pairs of a source, sorted by name, and how many images `exclude` left out.
    Missing folders, an empty image folder and two images with one stem are errors; a missing
    mask is returned as `mask=None` so the caller decides whether it may be skipped."""
    for directory, what in ((src.image_dir, "image"), (src.mask_dir, "mask")):
        if not directory.is_dir():
            raise DatasetError(f"{directory}: {what} folder of {src.source} not found")
    images = _files(src.image_dir, IMAGE_SUFFIXES)
    if not images:
        raise DatasetError(f"{src.image_dir}: empty folder (no {'/'.join(IMAGE_SUFFIXES)} images)")
    excluded = 0
    if src.exclude:
        kept = [p for p in images if src.exclude not in p.name]
        excluded = len(images) - len(kept)
        images = kept
        if not images:
            raise DatasetError(f"{src.image_dir}: every image is excluded ('{src.exclude}' in its name)")
    masks = {p.stem: p for p in _files(src.mask_dir, (MASK_SUFFIX,))}
    pairs: list[Pair] = []
    seen: dict[str, Path] = {}
    for image in images:
        if image.stem in seen:
            raise DatasetError(f"{image}: two images named {image.stem!r} (also {seen[image.stem]})")
        seen[image.stem] = image
        pairs.append(Pair(stem=image.stem, image=image, mask=masks.get(image.stem)))
    return pairs, excluded
