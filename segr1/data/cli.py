"""`segr1 data prepare|synth`: the command line over `prepare_dataset` and `write_synth`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from segr1.data.layouts import LAYOUTS, PairSource, parse_layout_spec, parse_pair_spec
from segr1.data.prepare import prepare_dataset
from segr1.data.records import DatasetError
from segr1.data.shards import DEFAULT_ROWS_PER_SHARD
from segr1.data.synth import KINDS, write_synth


def parse_size(text: str) -> tuple[int, int] | None:
    """`768` -> (768, 768); `640x480` -> (640, 480) as width x height; `original` -> None."""
    if text.lower() == "original":
        return None
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"size must be N, WxH or 'original', got {text!r}")
    return parts[0], parts[1]


def _layout_help() -> str:
    return "; ".join(f"{name}: {'|'.join(splits)}" for name, (splits, _) in LAYOUTS.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segr1 data", description="Build segr1 datasets.")
    commands = parser.add_subparsers(dest="command", required=True)

    prep = commands.add_parser(
        "prepare", help="convert image/ground-truth folders into Parquet shards"
    )
    prep.add_argument("--out", required=True, help="output dataset directory")
    prep.add_argument(
        "--layout",
        action="append",
        default=[],
        metavar="NAME:ROOT:SPLIT",
        help=f"a known dataset layout (repeatable); {_layout_help()}",
    )
    prep.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="IMAGE_DIR:MASK_DIR[:SOURCE[:TASK]]",
        help="any image folder with a mask folder (repeatable); name.jpg pairs with name.png",
    )
    prep.add_argument(
        "--size",
        type=parse_size,
        default=(768, 768),
        help="stored size: N, WxH, or 'original' to keep sizes and image bytes (default 768)",
    )
    prep.add_argument(
        "--skip-bad", action="store_true", help="skip bad pairs, report and list them"
    )
    prep.add_argument("--overwrite", action="store_true", help="replace a dataset in --out")
    prep.add_argument("--rows-per-shard", type=int, default=DEFAULT_ROWS_PER_SHARD)
    prep.add_argument("--workers", type=int, default=1, help="decoding processes (default 1)")

    synth = commands.add_parser("synth", help="make a synthetic camouflaged-object dataset")
    synth.add_argument("--out", required=True, help="output dataset directory")
    synth.add_argument("--count", type=int, required=True, help="number of records")
    synth.add_argument("--size", type=parse_size, default=(768, 768), help="N or WxH (default 768)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--kind", choices=sorted(KINDS), default="camouflage",
                       help="camouflage (task cod, the default) or salient (task sod)")
    synth.add_argument("--position-code", action="store_true",
                       help="red: brightness, green: column, blue: row (for tiny policies; docs/data.md)")
    synth.add_argument("--rows-per-shard", type=int, default=DEFAULT_ROWS_PER_SHARD)
    synth.add_argument("--overwrite", action="store_true", help="replace a dataset in --out")
    return parser


def _prepare(args: argparse.Namespace) -> None:
    sources: list[PairSource] = []
    for spec in args.layout:
        sources += parse_layout_spec(spec)
    sources += [parse_pair_spec(spec) for spec in args.pair]
    if not sources:
        raise DatasetError("give at least one --layout or --pair")
    report = prepare_dataset(
        sources,
        args.out,
        size=args.size,
        skip_bad=args.skip_bad,
        overwrite=args.overwrite,
        rows_per_shard=args.rows_per_shard,
        workers=args.workers,
        progress=True,
    )
    print(report.summary())


def _synth(args: argparse.Namespace) -> None:
    if args.size is None:
        raise DatasetError("synth needs a size (N or WxH), not 'original'")
    manifest = write_synth(
        args.out,
        args.count,
        args.size,
        args.seed,
        kind=args.kind,
        position_code=args.position_code,
        rows_per_shard=args.rows_per_shard,
        overwrite=args.overwrite,
        progress=True,
    )
    width, height = manifest["size"]
    print(
        f"wrote {manifest['count']} synthetic {args.kind} records ({width}x{height}, seed {args.seed}"
        f"{', position-coded' if args.position_code else ''}) "
        f"in {len(manifest['shards'])} shards to {args.out}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `segr1 data ...` and `python -m segr1.data ...`; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help and usage errors: keep argparse's message and status
        return int(exit_.code or 0)
    try:
        {"prepare": _prepare, "synth": _synth}[args.command](args)
    except (DatasetError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
