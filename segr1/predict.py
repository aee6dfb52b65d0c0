"""`python -m segr1.predict` / `segr1 predict`: batch inference with a trained policy and SAM2 on Ray Data.

    segr1 predict --policy runs/cod/export --sam2-checkpoint checkpoints/sam2.1_hiera_large.pt \\
        --input photos/ --task cod --out predictions/photos
    segr1 predict --policy runs/cod/export --sam2-checkpoint ... --input data/refcoco-val --out predictions/refcoco

``--input``: a folder of images (recursively; ``--task``, and ``--expression`` for refer/reason,
apply to all) or a prepared dataset (its records' tasks and first expressions, unless given). Out:
``predictions.jsonl`` (one line per image: its id, the prompts in the image's pixels, the
reasoning, the mask's file) and ``masks/<id>.png`` at each image's size. Re-running the same
command resumes: finished images are not redone. The settings are the training job's configuration,
as for ``segr1 eval``; the actor counts (``--rollout-actors``, ``--reward-actors``) set how many
engines and SAM2 copies Ray Data runs (docs/serve.md).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from segr1.config import command_parser, parse_command, resolve_models
from segr1.config.tools import Alias, ConfigError
from segr1.serving import ANSWER_ALIASES

ALIASES = [
    *ANSWER_ALIASES,
    Alias("--rollout-actors", "rollout.num_actors", "at most this many vLLM engines (Ray Data actors)"),
    Alias("--reward-actors", "reward.num_actors", "at most this many SAM2 copies (Ray Data actors)"),
    Alias("--max-image-pixels", "serve.max_image_pixels", "larger images get an error line"),
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser("segr1 predict", "Predict masks for a folder of images or a prepared dataset "
                            "(Ray Data), resumably.", ALIASES)
    parser.add_argument("--input", required=True, help="a folder of images, a prepared dataset or a .parquet shard "
                        "(a path or a pyarrow.fs URI such as s3://bucket/photos)")
    parser.add_argument("--out", required=True, type=Path, help="output folder: predictions.jsonl and masks/")
    parser.add_argument("--task", default=None, help="cod, sod, refer or reason (default for a dataset: each record's)")
    parser.add_argument("--expression", default=None, help="what to segment, for refer and reason")
    parser.add_argument("--batch-size", type=int, default=8, help="images per engine call and per SAM2 batch")
    parser.add_argument("--limit", type=int, default=None, help="predict at most N of the images still to do")
    parser.add_argument("--no-progress", action="store_true")
    try:
        args, config = parse_command(parser, ALIASES, argv)
        config = resolve_models(config)
    except SystemExit as exit_:  # --help and usage errors keep argparse's message and status
        return int(exit_.code or 0)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        print(f"error: --batch-size and --limit must be >= 1, got {args.batch_size} and {args.limit}", file=sys.stderr)
        return 2

    import ray

    from segr1.runtime.ray_cluster import connect
    from segr1.serving.answer import BadInput
    from segr1.serving.batch import PREDICTIONS, PredictError, Source, check_source, predict

    source = Source(args.input, args.task, args.expression)
    info = None
    try:
        listed = check_source(source)
        info = connect(**asdict(config.ray))
        counts = predict(config, source, listed, args.out, args.batch_size, args.limit, progress=not args.no_progress)
    except (PredictError, BadInput) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if info is not None and info.started_locally:
            ray.shutdown()
    print(f"predicted {counts['predicted']} images ({counts['errors']} with an error line), "
          f"{counts['done_before']} were already done: {args.out / PREDICTIONS}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
