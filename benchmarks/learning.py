"""Proof that the loop learns: GRPO on a policy that can write answers but does not know where objects are.

    .venv/bin/python benchmarks/learning.py [--minutes 30] [--out runs/learning]

1. Data: synthetic scenes (``segr1.data.synth``), 112 px, one object each: by default salient and
   position-coded (``--kind``, ``--position-code``), the scenes on which the tiny policy can learn
   to localise at all (``benchmarks/localisation.py``).
2. Warm start: ``python -m segr1.sft --random-coords`` teaches the tiny random Qwen2.5-VL the answer
   format (think, box, points, labels) with every coordinate drawn at random, so the warm-started
   policy writes well-formed answers whose boxes have nothing to do with the object.
3. GRPO: ``segr1.run``'s own job (tiny preset: vLLM rollouts, reward actor, DeepSpeed learner, weight
   sync) with the ``box`` segmenter, a deterministic stand-in for SAM2 whose best prompt is knowable
   (docs/reward.md), for ``--steps`` or until the time budget runs out. The learning rate follows a
   cosine from ``--lr`` to a tenth of it at ``--steps``: at a constant 3e-4 the tiny policy doubled its
   reward, then collapsed into malformed answers (docs/training.md). No KL term by default: the
   reference is the warm start, whose coordinates are random on purpose, so a KL to it pulls against
   exactly what this benchmark measures.

The first 10 steps sample the warm-started policy (each step moves it only a little); the last 10
sample what GRPO made of it. The goal is judged on the segmentation reward (0.7 IoU + 0.3 S-measure,
the part of the paper's reward that depends on where the answer points): it should at least double.
The total reward is printed beside it: it starts near 0.8 (at most 2), about 0.6 of it the format
part the warm start already earns, so it cannot double. The reward curve is saved as
``<out>/reward_curve.png``.

The same job also answers 64 held-out scenes greedily, once with the warm start (before the first
step) and once with the trained policy (after the last): the gain there is on images GRPO never
trained on, from one and the same starting point.

Last, it prints the image-blind answer: the one box that scores best on average over the training
scenes, and whether the trained policy beats it on the held-out scenes, that is, whether it looks
at each image rather than answering where objects tend to be. On camouflage scenes the tiny policy
cannot look even when supervised; on salient position-coded ones it can (docs/training.md).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from segr1.core.files import write_atomic
from segr1.core.metrics import iou, smeasure
from segr1.core.rewards import RewardWeights
from segr1.data.synth import KINDS

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # never ship the checkout to the workers
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

WINDOW = 10
PARTS = ("reward", "format", "iou", "segmentation")
HELDOUT = 64  # held-out scenes, scored greedily before and after GRPO
SHUTDOWN_MARGIN_S = 120  # held-out scoring, final checkpoint and actor shutdown, inside the budget


def warm_start(model: Path, data: Path, out: Path, args: argparse.Namespace) -> Path:
    """SFT with random coordinates in a child process (it runs its own one-rank DeepSpeed job)."""
    exported = out / "warm_start_hf"
    command = [
        sys.executable, "-m", "segr1.sft", "--model", str(model), "--data", str(data),
        "--output", str(out / "warm_start"), "--steps", str(args.sft_steps), "--batch-size", "16",
        "--micro-batch-size", "16", "--lr", "1e-3", "--random-coords", "--export", str(exported),
        "--seed", str(args.seed), "--min-pixels", str(args.policy_pixels), "--max-pixels", str(args.policy_pixels),
        "--dtype", "float32",
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return exported


def grpo(policy: Path, data: Path, heldout: Path, out: Path, args: argparse.Namespace,
         deadline: float) -> tuple[list[dict], dict[str, float], dict[str, float]]:
    """The GRPO steps' metrics, and greedy held-out scores of the warm start and of the trained policy."""
    from segr1.config import load_config
    from segr1.train.job import build_job

    config = load_config("tiny", [
        "--model.path", str(policy), "--sam2.backend", "box", "--data.train", str(data), "--data.eval", str(heldout),
        "--rollout.group_size", str(args.group_size), "--rollout.max_tokens", "96",
        "--trainer.prompts_per_step", str(args.prompts), "--trainer.steps", str(args.steps),
        "--trainer.mode", args.mode,
        "--learner.lr", str(args.lr), "--learner.lr_schedule", args.lr_schedule, "--learner.min_lr_ratio", "0.1",
        "--learner.micro_batch_size", "32", "--grpo.kl_coef", str(args.kl_coef),
        # An eval period past the run loads the held-out prompts; they are scored below, before and after.
        "--trainer.eval_every", str(10**9), "--trainer.sample_every", "0", "--trainer.checkpoint_every", "0",
        "--model.min_pixels", str(args.policy_pixels), "--model.max_pixels", str(args.policy_pixels),
        "--trainer.output_dir", str(out / "grpo"), "--trainer.seed", str(args.seed), "--data.seed", str(args.seed),
    ])
    job = build_job(config, out / "grpo")
    try:
        before = job.trainer.evaluate()
        timer = threading.Timer(deadline - time.monotonic(), job.trainer.request_stop)
        timer.start()
        try:
            job.trainer.fit()
        finally:
            timer.cancel()
        after = job.trainer.evaluate()
    finally:
        job.shutdown()
    lines = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "reward" in line and "eval_reward" not in line], before, after


def blind_box(masks: np.ndarray, step: int = 4) -> tuple[int, int, int, int]:
    """The one box (corners on a ``step``-pixel grid) with the best mean IoU over ``masks`` (N, H, W).

    It is the best answer a policy can give without looking at the image: what GRPO reaches when the
    policy cannot tell where the object is and learns only where objects tend to be.
    """
    _, height, width = masks.shape
    area = masks.sum(axis=(1, 2))
    # Summed-area table: the mask pixels inside [y0, y1) x [x0, x1) in four lookups, for all masks at once.
    table = np.pad(masks.cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))
    xs, ys = np.arange(0, width + 1, step), np.arange(0, height + 1, step)
    best, best_box = -1.0, (0, 0, width, height)
    for i, y0 in enumerate(ys):
        for y1 in ys[i + 1 :]:
            rows = table[:, y1, xs] - table[:, y0, xs]  # (N, len(xs)): mask pixels in rows [y0, y1) left of x
            inside = rows[:, None, :] - rows[:, :, None]  # [n, a, b]: in columns [xs[a], xs[b])
            boxes = (xs[None, :] - xs[:, None]) * (y1 - y0)
            iou = inside / np.maximum(area[:, None, None] + boxes - inside, 1)
            mean = np.where(boxes > 0, iou.mean(axis=0), -1.0)
            a, b = np.unravel_index(int(mean.argmax()), mean.shape)
            if mean[a, b] > best:
                best, best_box = float(mean[a, b]), (int(xs[a]), int(y0), int(xs[b]), int(y1))
    return best_box


def blind_scores(box: tuple[int, int, int, int], masks: np.ndarray) -> dict[str, float]:
    """Mean IoU and segmentation reward of answering ``box`` for every one of ``masks``."""
    weights = RewardWeights()
    pred = np.zeros(masks.shape[1:], dtype=bool)
    pred[box[1] : box[3], box[0] : box[2]] = True
    ious = [iou(pred, mask) for mask in masks]
    segmentation = [weights.iou * i + weights.smeasure * smeasure(pred, mask) for i, mask in zip(ious, masks)]
    return {"iou": float(np.mean(ious)), "segmentation": float(np.mean(segmentation))}


def window_means(steps: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
    def mean(window: list[dict]) -> dict[str, float]:
        return {key: sum(step[key] for step in window) / len(window) for key in PARTS}

    return mean(steps[:WINDOW]), mean(steps[-WINDOW:])


def plot(steps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [step["step"] for step in steps]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in PARTS:
        y = np.array([step[key] for step in steps])
        smooth = np.convolve(y, np.ones(WINDOW) / WINDOW, mode="valid")
        (line,) = ax.plot(x, y, alpha=0.2)
        ax.plot(x[WINDOW - 1 :], smooth, color=line.get_color(), label=f"{key} ({WINDOW}-step mean)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean over the step's samples")
    ax.set_title("GRPO from a random-coordinate warm start (tiny Qwen2.5-VL, box segmenter)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    write_atomic(path, png.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="budget for everything, warm start included")
    parser.add_argument("--out", type=Path, default=Path("runs/learning"))
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--sft-steps", type=int, default=400)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per GRPO step")
    parser.add_argument("--steps", type=int, default=500, help="GRPO steps, unless the budget ends first")
    parser.add_argument("--mode", choices=("sync", "async"), default="sync",
                        help="async: the next step's rollouts run while the learner trains (one step off-policy)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine",
                        help="cosine: down to 0.1 x lr at --steps")
    parser.add_argument("--policy-pixels", type=int, default=112 * 112,
                        help="the policy sees each scene resized to this many pixels (28 x 28 per image token)")
    parser.add_argument("--seed", type=int, default=0, help="draws the scenes, the tiny model and the sampling")
    parser.add_argument("--kind", choices=sorted(KINDS), default="salient", help="synthetic scene kind")
    parser.add_argument("--position-code", action=argparse.BooleanOptionalAction, default=True,
                        help="scenes whose green and blue channels give each pixel's column and row")
    parser.add_argument("--kl-coef", type=float, default=0.0, help="KL to the warm start (the paper uses 0.04)")
    args = parser.parse_args()
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)

    from segr1.data import synth_records, write_synth
    from segr1.testing.tiny import build_qwen

    data, heldout = args.out / "data", args.out / "heldout"
    scenes = {"kind": args.kind, "position_code": args.position_code}
    write_synth(data, args.records, 112, seed=args.seed, overwrite=True, **scenes)
    write_synth(heldout, HELDOUT, 112, seed=args.seed + 10_000, overwrite=True, **scenes)  # never trained on
    policy = warm_start(build_qwen(seed=args.seed), data, args.out, args)
    sft_s = time.monotonic() - started
    print(f"warm start (SFT, random coordinates, {args.sft_steps} steps): {sft_s:.0f} s", flush=True)

    deadline = started + args.minutes * 60 - SHUTDOWN_MARGIN_S
    if deadline - time.monotonic() < 120:
        raise SystemExit(f"--minutes {args.minutes}: too short, the warm start alone took {sft_s:.0f} s")
    steps, before, after = grpo(policy, data, heldout, args.out, args, deadline)
    if len(steps) < 2 * WINDOW:
        raise SystemExit(f"only {len(steps)} GRPO steps ran; need {2 * WINDOW} to compare windows")
    first, last = window_means(steps)
    curve = args.out / "reward_curve.png"
    plot(steps, curve)

    total_min = (time.monotonic() - started) / 60
    print(f"\n{len(steps)} GRPO steps x {args.prompts} prompts x G={args.group_size}; "
          f"{total_min:.1f} min in all (budget {args.minutes:g})")
    print(f"{'':<14}{'first ' + str(WINDOW):>10}{'last ' + str(WINDOW):>10}{'last/first':>12}")
    for key in PARTS:
        print(f"{key:<14}{first[key]:>10.3f}{last[key]:>10.3f}{last[key] / max(first[key], 1e-9):>12.2f}")
    print(f"held-out ({HELDOUT} unseen scenes, greedy): reward {before['eval_reward']:.3f} -> "
          f"{after['eval_reward']:.3f}, IoU {before['eval_iou']:.3f} -> {after['eval_iou']:.3f} "
          "(warm start -> after GRPO)")
    train_masks = np.stack([record.mask for record in synth_records(args.records, 112, args.seed, **scenes)])
    heldout_masks = np.stack([record.mask for record in synth_records(HELDOUT, 112, args.seed + 10_000, **scenes)])
    box = blind_box(train_masks)
    blind, blind_heldout = blind_scores(box, train_masks), blind_scores(box, heldout_masks)
    print(f"image-blind answer, the one box best on average over the training scenes {list(box)}: "
          f"segmentation {blind['segmentation']:.3f} (x{blind['segmentation'] / max(first['segmentation'], 1e-9):.2f}"
          f" the first {WINDOW}; the last {WINDOW} reach {last['segmentation'] / blind['segmentation']:.0%} of it), "
          f"IoU {blind['iou']:.3f}, held-out IoU {blind_heldout['iou']:.3f}")
    ratio = last["segmentation"] / max(first["segmentation"], 1e-9)
    verdict = "met" if ratio >= 2 and total_min <= args.minutes else "NOT met"
    print(f"goal (segmentation reward at least doubles within {args.minutes:g} min): {verdict}, x{ratio:.2f}")
    looks = "yes" if after["eval_iou"] > blind_heldout["iou"] else "no"
    print(f"does the trained policy look at each image (held-out IoU above the image-blind box's)? {looks}: "
          f"{after['eval_iou']:.3f} vs {blind_heldout['iou']:.3f}")
    print(f"reward curve: {curve}")


if __name__ == "__main__":
    main()
