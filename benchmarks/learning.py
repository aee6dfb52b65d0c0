"""Learning to look: GRPO on a weak grounder, against a control whose advantages carry no information.

    .venv/bin/python benchmarks/learning.py [--seeds 0 1 2] [--minutes 20] [--temperature 0.7] [--out runs/learning]

For each seed, on the paper's premise (RL teaches a model that can already ground objects to
prompt the segmenter well):

1. Data: synthetic scenes (``segr1.data.synth``), 112 px, one object each: by default salient and
   position-coded (``--kind``, ``--position-code``), the scenes on which the tiny policy can learn
   to localise at all (``benchmarks/localisation.py``), and 64 held-out ones never trained on.
2. Warm start (``--warm-start grounder``): ``python -m segr1.sft`` on the true boxes, just long
   enough to make the tiny random Qwen2.5-VL a weak grounder: ``--sft-steps``, then ``--sft-more``
   at a time until its held-out greedy IoU is ``--start-margin`` above the image-blind box's (at
   most ``--sft-max-steps``). ``--warm-start format`` is the older start: the answer format with
   random coordinates, ``--sft-steps`` long.
3. GRPO: ``segr1.run``'s own job (tiny preset: vLLM rollouts, reward actor, DeepSpeed learner,
   weight sync) with the ``box`` segmenter (a deterministic stand-in for SAM2 whose best prompt is
   knowable, docs/reward.md), for ``--steps`` or ``--minutes``, whichever ends first. The learning
   rate (``--lr``, 1e-4) follows a cosine to a tenth of it at ``--steps``; KL ``--kl-coef`` (0.04) to the
   warm start; the groups are sampled at ``--temperature`` (0.7: near the greedy answer, so that
   the group's rewards rank answers around it; docs/training.md measures 1.0, the paper's, too).
4. Control (``--control``, on by default): the same run from the same warm start with
   ``grpo.shuffle_rewards`` (each group trained on another group's rewards), so what it gains does
   not come from the rewards.

Each run answers the held-out scenes greedily before its first step and after its last. The
image-blind answer is the one box that scores best on average over the training scenes: a policy
that beats it on held-out scenes looks at each image.

Goal, per seed: the trained policy's held-out IoU at least 0.05 above its warm start's and above
the blind box's; the control's at most 0.02 above the warm start's; the trained policy's format
reward over its last 10 steps not below its first 10. One table row per seed; the curves go to
``<out>/seed_<k>/{grpo,control}_curve.png``; the last line is JSON.
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
HELDOUT = 64  # held-out scenes, scored greedily before and after each run
GAIN, CONTROL_GAIN = 0.05, 0.02  # the goal's margins on held-out IoU


def warm_start(model: Path, data: Path, out: Path, seed: int, steps: int, args: argparse.Namespace) -> Path:
    """SFT in a child process (it runs its own one-rank DeepSpeed job) up to ``steps``: on the true
    boxes (a weak grounder) or with random coordinates (the format only). Past ``--sft-steps`` it
    resumes the shorter start's checkpoint under ``out/warm_start``; a fresh start replaces it."""
    exported = out / f"warm_start_{steps}_hf"
    command = [
        sys.executable, "-m", "segr1.sft", "--model", str(model), "--data", str(data),
        "--output", str(out / "warm_start"), "--steps", str(steps), "--batch-size", "16",
        "--micro-batch-size", "16", "--lr", "1e-3", "--export", str(exported),
        "--seed", str(seed), "--min-pixels", str(args.policy_pixels), "--max-pixels", str(args.policy_pixels),
        "--dtype", "float32",
    ]
    if args.warm_start == "format":
        command.append("--random-coords")
    if steps > args.sft_steps:
        command.append("--resume")
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return exported


def weak_grounder(model: Path, data: Path, heldout: Path, out: Path, seed: int, blind: float,
                  args: argparse.Namespace) -> tuple[Path, list[list]]:
    """``--sft-steps`` of SFT, then ``--sft-more`` at a time until the held-out greedy IoU passes the
    blind box's by ``--start-margin`` (up to ``--sft-max-steps``): the weak grounder of the paper's
    premise on every seed, since how many steps make one varies with the seed. Returns the policy
    and the (steps, held-out IoU) of each start tried."""
    steps, tried = args.sft_steps, []
    while True:
        policy = warm_start(model, data, out, seed, steps, args)
        if args.warm_start == "format":
            return policy, tried  # the format start is meant to be blind
        iou = heldout_iou(policy, data, heldout, out / f"warm_start_{steps}_check", seed, args)
        tried.append([steps, round(iou, 3)])
        print(f"seed {seed}: {steps} SFT steps: held-out IoU {iou:.3f} (blind box {blind:.3f})", flush=True)
        if iou > blind + args.start_margin or steps + args.sft_more > args.sft_max_steps:
            return policy, tried
        steps += args.sft_more


def job_config(policy: Path, data: Path, heldout: Path, out: Path, seed: int, shuffle: bool,
               args: argparse.Namespace):
    """The tiny preset's job from ``policy``; ``shuffle``: the control."""
    from segr1.config import load_config

    return load_config("tiny", [
        "--model.path", str(policy), "--sam2.backend", "box", "--data.train", str(data), "--data.eval", str(heldout),
        "--rollout.group_size", str(args.group_size), "--rollout.max_tokens", "96",
        "--rollout.temperature", str(args.temperature),
        "--trainer.prompts_per_step", str(args.prompts), "--trainer.steps", str(args.steps),
        "--trainer.mode", args.mode, "--grpo.shuffle_rewards", str(shuffle).lower(),
        "--learner.lr", str(args.lr), "--learner.lr_schedule", args.lr_schedule, "--learner.min_lr_ratio", "0.1",
        "--learner.micro_batch_size", "32", "--grpo.kl_coef", str(args.kl_coef),
        # With no period, one past the run still loads the held-out prompts, scored below before and after.
        "--trainer.eval_every", str(args.eval_every or 10**9),
        "--trainer.sample_every", "0", "--trainer.checkpoint_every", "0",
        "--model.min_pixels", str(args.policy_pixels), "--model.max_pixels", str(args.policy_pixels),
        "--trainer.output_dir", str(out), "--trainer.seed", str(seed), "--data.seed", str(seed),
    ])


def heldout_iou(policy: Path, data: Path, heldout: Path, out: Path, seed: int, args: argparse.Namespace) -> float:
    """The held-out greedy IoU of ``policy``, scored by the job's own evaluation, as before a GRPO run."""
    from segr1.train.job import build_job

    job = build_job(job_config(policy, data, heldout, out, seed, False, args), out)
    try:
        return job.trainer.evaluate()["eval_iou"]
    finally:
        job.shutdown()


def grpo(policy: Path, data: Path, heldout: Path, out: Path, seed: int, shuffle: bool,
         args: argparse.Namespace) -> tuple[list[dict], list[dict], dict[str, float], dict[str, float]]:
    """One run's steps, its held-out evaluations (step 0, then every ``--eval-every`` steps), and its greedy
    held-out scores before and after it; ``shuffle``: the control."""
    from segr1.train.job import build_job

    job = build_job(job_config(policy, data, heldout, out, seed, shuffle, args), out)
    try:
        before = job.trainer.evaluate()
        timer = threading.Timer(args.minutes * 60, job.trainer.request_stop)
        timer.start()
        try:
            job.trainer.fit()
        finally:
            timer.cancel()
        after = job.trainer.evaluate()
    finally:
        job.shutdown()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "reward" in line and "eval_reward" not in line]
    evals = [{"step": 0, **before}] + [line for line in lines if "eval_iou" in line]
    return steps, evals, before, after


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


def plot(steps: list[dict], evals: list[dict], path: Path, title: str) -> None:
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
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_iou"] for e in evals], "ko-", label="held-out IoU (greedy)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean over the step's samples")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    write_atomic(path, png.getvalue())


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    from segr1.data import synth_records, write_synth
    from segr1.testing.tiny import build_qwen

    out = args.out / f"seed_{seed}"
    out.mkdir(parents=True, exist_ok=True)
    data, heldout = out / "data", out / "heldout"
    scenes = {"kind": args.kind, "position_code": args.position_code}
    write_synth(data, args.records, 112, seed=seed, overwrite=True, **scenes)
    write_synth(heldout, HELDOUT, 112, seed=seed + 10_000, overwrite=True, **scenes)
    train_masks = np.stack([r.mask for r in synth_records(args.records, 112, seed, **scenes)])
    heldout_masks = np.stack([r.mask for r in synth_records(HELDOUT, 112, seed + 10_000, **scenes)])
    blind = blind_scores(blind_box(train_masks), heldout_masks)["iou"]
    started = time.monotonic()
    policy, tried = weak_grounder(build_qwen(seed=seed), data, heldout, out, seed, blind, args)
    print(f"seed {seed}: warm start ({args.warm_start}, {tried[-1][0] if tried else args.sft_steps} SFT steps) in "
          f"{time.monotonic() - started:.0f} s", flush=True)
    steps, evals, before, after = grpo(policy, data, heldout, out / "grpo", seed, False, args)
    if len(steps) < 2 * WINDOW:
        raise SystemExit(f"seed {seed}: only {len(steps)} GRPO steps ran; need {2 * WINDOW} to compare windows")
    plot(steps, evals, out / "grpo_curve.png", f"GRPO from a {args.warm_start} warm start, seed {seed}")
    first, last = window_means(steps)
    row = {"seed": seed, "steps": len(steps), "warm_start_tried": tried, "blind_box": blind,
           "warm_start": before["eval_iou"], "grpo": after["eval_iou"],
           "format_first": first["format"], "format_last": last["format"],
           "heldout_curve": [[e["step"], round(e["eval_iou"], 3)] for e in evals]}
    if args.control:
        control_steps, control_evals, _, control = grpo(policy, data, heldout, out / "control", seed, True, args)
        plot(control_steps, control_evals, out / "control_curve.png",
             f"control (rewards shuffled across groups), seed {seed}")
        row.update(control=control["eval_iou"], control_steps=len(control_steps),
                   control_heldout_curve=[[e["step"], round(e["eval_iou"], 3)] for e in control_evals])
    row["goal_met"] = (row["grpo"] >= row["warm_start"] + GAIN and row["grpo"] > row["blind_box"]
                       and row["format_last"] >= row["format_first"]
                       and (not args.control or row["control"] <= row["warm_start"] + CONTROL_GAIN))
    print(json.dumps({"seed_row": row}), flush=True)  # each seed's row as soon as it is known
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="each draws the scenes, the tiny model and the sampling")
    parser.add_argument("--minutes", type=float, default=20.0, help="budget of each GRPO run (and of the control)")
    parser.add_argument("--out", type=Path, default=Path("runs/learning"))
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--warm-start", choices=("grounder", "format"), default="grounder",
                        help="SFT on the true boxes, or on random coordinates (the format only)")
    parser.add_argument("--sft-steps", type=int, default=160, help="SFT steps of the first warm start tried")
    parser.add_argument("--sft-more", type=int, default=40,
                        help="SFT steps added while the start's held-out IoU is not above the blind box + margin")
    parser.add_argument("--sft-max-steps", type=int, default=400, help="the most SFT steps of a warm start")
    parser.add_argument("--start-margin", type=float, default=0.02,
                        help="how far above the blind box's held-out IoU the grounder warm start must be")
    parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the control: the same run with the rewards shuffled across groups")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per GRPO step")
    parser.add_argument("--steps", type=int, default=500, help="GRPO steps, unless --minutes ends the run first")
    parser.add_argument("--mode", choices=("sync", "async"), default="sync",
                        help="async: the next step's rollouts run while the learner trains (one step off-policy)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine",
                        help="cosine: down to 0.1 x lr at --steps")
    parser.add_argument("--policy-pixels", type=int, default=112 * 112,
                        help="the policy sees each scene resized to this many pixels (28 x 28 per image token)")
    parser.add_argument("--kind", choices=sorted(KINDS), default="salient", help="synthetic scene kind")
    parser.add_argument("--position-code", action=argparse.BooleanOptionalAction, default=True,
                        help="scenes whose green and blue channels give each pixel's column and row")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="also answer the held-out scenes every this many steps (0: before and after only)")
    parser.add_argument("--kl-coef", type=float, default=0.04, help="KL to the warm start (the paper's 0.04)")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="the groups' sampling temperature (the paper's is 1.0); the held-out answers stay greedy")
    args = parser.parse_args()

    rows = [run_seed(seed, args) for seed in args.seeds]
    print(f"\nheld-out IoU ({HELDOUT} unseen scenes, greedy); goal: GRPO >= warm start + {GAIN} and > blind box, "
          f"control <= warm start + {CONTROL_GAIN}, format last {WINDOW} >= first {WINDOW}")
    print(f"{'seed':>4} {'SFT':>4} {'steps':>6} {'warm start':>11} {'GRPO':>7} {'control':>8} {'blind box':>10} "
          f"{'format first -> last':>21} {'goal':>5}")
    for row in rows:
        control = f"{row['control']:8.3f}" if "control" in row else f"{'-':>8}"
        sft = row["warm_start_tried"][-1][0] if row["warm_start_tried"] else args.sft_steps
        print(f"{row['seed']:>4} {sft:>4} {row['steps']:>6} {row['warm_start']:>11.3f} {row['grpo']:>7.3f} {control} "
              f"{row['blind_box']:>10.3f} {row['format_first']:>10.3f} -> {row['format_last']:<7.3f} "
              f"{'met' if row['goal_met'] else 'NOT':>5}")
    print(json.dumps({"rows": rows, "goal_met": all(row["goal_met"] for row in rows)}))


if __name__ == "__main__":
    main()
