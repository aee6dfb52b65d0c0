"""`python -m segr1.eval` / `segr1 eval`: evaluate a policy checkpoint with SAM2 on the paper's benchmarks.

    python -m segr1.eval --policy runs/cod/export --sam2-checkpoint checkpoints/sam2.1_hiera_large.pt \\
        --benchmark cod10k-test:/data/COD10K-v3 --benchmark refcoco:/data/refer_seg/refcoco:val \\
        --out results/cod

The settings are the training job's configuration (``--config``: a preset or YAML file, none by
default, then ``--section.key VALUE`` overrides); the short flags above are aliases of its keys
(``--policy`` is ``model.path``, ``--sam2-checkpoint`` is ``sam2.checkpoint``, and so on), and the
``evaluation`` section holds what only evaluation has. Evaluate with the configuration the policy
was trained with, so the engines resize images with its ``model.min_pixels``/``max_pixels``.

Every benchmark is checked (folders listed, annotation files parsed, files found) before Ray or
any model starts. Re-running the same command resumes: finished examples are not redone. See
docs/eval.md for the accepted dataset layouts and the outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from segr1.config import Config, command_parser, parse_command, resolve_models
from segr1.config.tools import Alias, ConfigError
from segr1.data.records import DatasetError
from segr1.evaluation.datasets import GENERIC, KINDS, LoadOptions, parse_benchmark
from segr1.evaluation.job import JobOptions, run_job
from segr1.evaluation.results import EvalError

ALIASES = [
    Alias("--policy", "model.path", "Hugging Face model directory, or 'tiny' (the tiny random Qwen2.5-VL)", text=True),
    Alias("--sam2-config", "sam2.config", "SAM2 config name", text=True),
    Alias("--sam2-checkpoint", "sam2.checkpoint", "SAM2 checkpoint file, or 'tiny' (a random tiny SAM2)", text=True),
    Alias("--sam2-size", "sam2.image_size", "SAM2 input size (null: the config's, 1024)"),
    Alias("--min-pixels", "model.min_pixels", "policy image bounds: evaluate with those the policy was trained with"),
    Alias("--max-pixels", "model.max_pixels", "see --min-pixels"),
    Alias("--dtype", "model.dtype"),
    Alias("--max-model-len", "rollout.max_model_len"),
    Alias("--kv-cache-mb", "rollout.kv_cache_memory_bytes", "vLLM KV cache on CPU, MiB", convert=lambda v: int(v) << 20),
    Alias("--rollout-actors", "rollout.num_actors"),
    Alias("--reward-actors", "reward.num_actors"),
    Alias("--rollout-gpus", "rollout.num_gpus_per_actor", "GPUs per rollout actor (when the cluster has GPUs)"),
    Alias("--reward-gpus", "reward.num_gpus_per_actor", "GPUs per reward actor (fractions pack several)"),
    Alias("--no-bf16", "reward.bf16", "SAM2 without bfloat16 autocast", const=False),
    Alias("--policy-size", "evaluation.policy_size", "side of the square the image is resized to before the "
          "policy's processor (null: 768 for COD/SOD, 1024 for referring/reasoning); the processor rounds it to "
          "its frame (768 -> 756)"),
    Alias("--limit", "evaluation.limit", "evaluate the first N examples of each benchmark"),
    Alias("--reason-texts", "evaluation.reason_texts", "ReasonSeg: each image's first query (LISA's) or all"),
    Alias("--temperature", "evaluation.temperature", "0 = greedy"),
    Alias("--top-p", "evaluation.top_p"),
    Alias("--max-tokens", "evaluation.max_tokens"),
    Alias("--seed", "evaluation.seed", "engine seed, and sampling seed when temperature > 0"),
    Alias("--prompts-per-call", "evaluation.prompts_per_call", "prompts per vLLM generate call"),
    Alias("--gallery", "evaluation.gallery", "best and worst N per benchmark in the gallery (0: none)"),
    Alias("--ray-address", "ray.address", "join this Ray cluster (default: RAY_ADDRESS, else start one)", text=True),
    Alias("--num-cpus", "ray.num_cpus", "CPUs of a Ray cluster started here"),
]


def build_parser() -> argparse.ArgumentParser:
    names = ", ".join([*KINDS, *GENERIC])
    p = command_parser(
        "segr1 eval", "Evaluate a policy checkpoint with SAM2 on COD/SOD, referring and reasoning benchmarks.",
        ALIASES,
    )
    p.add_argument(
        "--benchmark", action="append", required=True, metavar="NAME:PATH[:SPLIT]",
        help=f"repeatable; names: {names}. Splits: refcoco/refcoco+ val|testA|testB, refcocog val|test, "
        "reasonseg val|test. PATH may be a folder layout or a prepared dataset (manifest.json)",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (results, masks, gallery)")
    p.add_argument("--coco-images", type=Path, default=None, help="COCO train2014 image folder (RefCOCO/+/g)")
    p.add_argument("--restart", action="store_true", help="discard results in --out instead of resuming")
    p.add_argument("--no-progress", action="store_true")
    return p


@contextlib.contextmanager
def ray_predictor(config: Config) -> Iterator[Any]:
    """Join or start Ray, start the actor pools; on exit stop the pools and a cluster started here."""
    import ray

    from segr1.evaluation.runner import RayPredictor
    from segr1.runtime.ray_cluster import connect

    info = connect(**asdict(config.ray))
    try:
        predictor = RayPredictor(config.model, config.sam2, config.rollout, config.reward, config.evaluation)
        try:
            yield predictor
        finally:
            predictor.shutdown()
    finally:
        if info.started_locally:
            ray.shutdown()


def recorded_settings(config: Config) -> dict[str, Any]:
    """What the results depend on: a resumed run must match these (actor counts may change)."""
    model, sam2, evaluation = config.model, config.sam2, config.evaluation
    return {
        "policy": model.path,
        "sam2_config": sam2.config,
        "sam2_checkpoint": sam2.checkpoint,
        "sam2_size": sam2.image_size,
        "min_pixels": model.min_pixels,
        "max_pixels": model.max_pixels,
        "sampling": asdict(evaluation.sampling()),
        "dtype": model.dtype,
        "reason_texts": evaluation.reason_texts,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, config = parse_command(parser, ALIASES, argv)
    except SystemExit as exit_:  # --help and usage errors keep argparse's message and status
        return int(exit_.code or 0)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        evaluation = config.evaluation
        options = LoadOptions(coco_images=args.coco_images, reason_texts=evaluation.reason_texts)
        benchmarks = [parse_benchmark(spec, options) for spec in args.benchmark]
        for b in benchmarks:
            print(f"{b.title}: {b.count} examples ({b.spec})", flush=True)
        config = resolve_models(config)
        job = JobOptions(
            out_dir=args.out,
            settings=recorded_settings(config),
            evaluation=evaluation,
            restart=args.restart,
            progress=not args.no_progress,
        )
        outcome = run_job(benchmarks, job, lambda: ray_predictor(config))
    except (DatasetError, EvalError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(outcome.results_md.read_text())
    print(f"results: {outcome.results_json} and {outcome.results_md}")
    if outcome.gallery is not None:
        print(f"gallery: {outcome.gallery}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
