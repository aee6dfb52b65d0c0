"""`python -m segr1.eval` / `segr1 eval`: evaluate a policy checkpoint with SAM2 on the paper's benchmarks.

    python -m segr1.eval --policy runs/cod/export --sam2-checkpoint checkpoints/sam2.1_hiera_large.pt \\
        --benchmark cod10k-test:/data/COD10K-v3 --benchmark refcoco:/data/refer_seg/refcoco:val \\
        --out results/cod

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

from segr1.data.records import DatasetError
from segr1.evaluation.datasets import GENERIC, KINDS, LoadOptions, parse_benchmark
from segr1.evaluation.job import JobOptions, run_job
from segr1.evaluation.results import EvalError

TINY = "tiny"
DEFAULT_SAM2_CONFIG = "configs/sam2.1/sam2.1_hiera_l.yaml"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    names = ", ".join([*KINDS, *GENERIC])
    p = argparse.ArgumentParser(
        prog="segr1 eval",
        description="Evaluate a policy checkpoint with SAM2 on COD/SOD, referring and reasoning benchmarks.",
    )
    p.add_argument("--policy", required=True, help="Hugging Face model directory, or 'tiny' (random tiny Qwen2.5-VL)")
    p.add_argument(
        "--benchmark", action="append", required=True, metavar="NAME:PATH[:SPLIT]",
        help=f"repeatable; names: {names}. Splits: refcoco/refcoco+ val|testA|testB, refcocog val|test, "
        "reasonseg val|test. PATH may be a folder layout or a prepared dataset (manifest.json)",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (results, masks, gallery)")
    p.add_argument("--sam2-config", default=None, help=f"SAM2 config name (default {DEFAULT_SAM2_CONFIG})")
    p.add_argument("--sam2-checkpoint", required=True, help="SAM2 checkpoint file, or 'tiny' (random tiny SAM2)")
    p.add_argument("--sam2-size", type=_positive, default=None, help="SAM2 input size (default: the config's, 1024)")
    p.add_argument(
        "--policy-size", type=_positive, default=None,
        help="side of the square the image is resized to before the policy's processor (default: 768 for "
        "COD/SOD, 1024 for referring/reasoning); the processor rounds it to its frame (768 -> 756)",
    )
    p.add_argument("--min-pixels", type=_positive, default=None,
                   help="policy image bounds (default: the policy's own; an export keeps its run's)")
    p.add_argument("--max-pixels", type=_positive, default=None, help="see --min-pixels")
    p.add_argument("--limit", type=_positive, default=None, help="evaluate the first N examples of each benchmark")
    p.add_argument("--coco-images", type=Path, default=None, help="COCO train2014 image folder (RefCOCO/+/g)")
    p.add_argument("--reason-texts", choices=("first", "all"), default="first",
                   help="ReasonSeg: each image's first query (LISA's protocol) or every query")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=_positive, default=400)
    p.add_argument("--seed", type=int, default=0, help="engine seed, and sampling seed when temperature > 0")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--max-model-len", type=_positive, default=4096)
    p.add_argument("--rollout-actors", type=_positive, default=1)
    p.add_argument("--reward-actors", type=_positive, default=1)
    p.add_argument("--rollout-gpus", type=float, default=1.0, help="GPUs per rollout actor (when the cluster has GPUs)")
    p.add_argument("--reward-gpus", type=float, default=1.0, help="GPUs per reward actor (fractions pack several)")
    p.add_argument("--prompts-per-call", type=_positive, default=8, help="prompts per vLLM generate call")
    p.add_argument("--kv-cache-mb", type=_positive, default=1024, help="vLLM KV cache on CPU, MiB")
    p.add_argument("--no-bf16", action="store_true", help="SAM2 without bfloat16 autocast")
    p.add_argument("--gallery", type=int, default=8, help="best and worst N per benchmark in the gallery (0: none)")
    p.add_argument("--restart", action="store_true", help="discard results in --out instead of resuming")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: RAY_ADDRESS, else start one)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs of a Ray cluster started here")
    p.add_argument("--no-progress", action="store_true")
    return p


def resolve_models(args: argparse.Namespace) -> tuple[str, str, str]:
    """(policy directory, SAM2 config, SAM2 checkpoint); 'tiny' builds or reuses the tiny models."""
    if args.policy == TINY:
        from segr1.testing.tiny import build_qwen

        policy = str(build_qwen())
    else:
        path = Path(args.policy).expanduser()
        if not (path / "config.json").is_file():
            raise EvalError(f"{path}: not a Hugging Face model directory (no config.json)")
        policy = str(path.resolve())
    if args.sam2_checkpoint == TINY:
        from segr1.testing.tiny import SAM2_TINY_CONFIG

        return policy, args.sam2_config or SAM2_TINY_CONFIG, TINY
    checkpoint = Path(args.sam2_checkpoint).expanduser()
    if not checkpoint.is_file():
        raise EvalError(f"{checkpoint}: SAM2 checkpoint not found")
    return policy, args.sam2_config or DEFAULT_SAM2_CONFIG, str(checkpoint.resolve())


def _runner_settings(args: argparse.Namespace, policy: str, sam2_config: str, sam2_checkpoint: str) -> Any:
    from actors.rollout import SamplingSettings
    from segr1.evaluation.runner import RunnerSettings

    sampling = SamplingSettings(
        n=1,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed if args.temperature > 0 else None,
    )
    return RunnerSettings(
        policy=policy,
        sam2_config=sam2_config,
        sam2_checkpoint=sam2_checkpoint,
        sam2_size=args.sam2_size,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        rollout_actors=args.rollout_actors,
        reward_actors=args.reward_actors,
        sampling=sampling,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_memory_bytes=args.kv_cache_mb << 20,
        rollout_gpus=args.rollout_gpus,
        reward_gpus=args.reward_gpus,
        bf16=not args.no_bf16,
        prompts_per_call=args.prompts_per_call,
        seed=args.seed,
    )


@contextlib.contextmanager
def ray_predictor(args: argparse.Namespace, settings: Any) -> Iterator[Any]:
    """Join or start Ray, start the actor pools; on exit stop the pools and a cluster started here."""
    import ray

    from segr1.evaluation.runner import RayPredictor
    from segr1.runtime.ray_cluster import connect

    info = connect(address=args.ray_address, num_cpus=args.num_cpus)
    try:
        predictor = RayPredictor(settings)
        try:
            yield predictor
        finally:
            predictor.shutdown()
    finally:
        if info.started_locally:
            ray.shutdown()


def recorded_settings(args: argparse.Namespace, settings: Any) -> dict[str, Any]:
    """What the results depend on: a resumed run must match these (actor counts may change)."""
    return {
        "policy": settings.policy,
        "sam2_config": settings.sam2_config,
        "sam2_checkpoint": settings.sam2_checkpoint,
        "sam2_size": settings.sam2_size,
        "min_pixels": settings.min_pixels,
        "max_pixels": settings.max_pixels,
        "sampling": asdict(settings.sampling),
        "dtype": settings.dtype,
        "reason_texts": args.reason_texts,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help and usage errors keep argparse's message and status
        return int(exit_.code or 0)
    try:
        options = LoadOptions(coco_images=args.coco_images, reason_texts=args.reason_texts)
        benchmarks = [parse_benchmark(spec, options) for spec in args.benchmark]
        for b in benchmarks:
            print(f"{b.title}: {b.count} examples ({b.spec})", flush=True)
        policy, sam2_config, sam2_checkpoint = resolve_models(args)
        settings = _runner_settings(args, policy, sam2_config, sam2_checkpoint)
        job = JobOptions(
            out_dir=args.out,
            settings=recorded_settings(args, settings),
            policy_size=args.policy_size,
            limit=args.limit,
            restart=args.restart,
            gallery=args.gallery,
            progress=not args.no_progress,
        )
        outcome = run_job(benchmarks, job, lambda: ray_predictor(args, settings))
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
