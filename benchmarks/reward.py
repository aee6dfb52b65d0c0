"""Groups per second of reward scoring: the paper's per-sample SAM2 loop against one encode per group.

    .venv/bin/python benchmarks/reward.py [--group-sizes 4 8] [--groups 6] [--image-size 768]
        [--duplicates 0 0.5 0.9] [--sam2-image-size 256] [--decode-chunk 0] [--pad-to 0] [--threads 1]
        [--sam2-config C --sam2-checkpoint P] [--device cpu|cuda] [--bf16]

(a) "per-sample" is how the Seg-R1 code scores: for every completion it sets the image on SAM2
(one encode per sample), then decodes each box with its points one ``predict`` at a time.
(b) "per-group" is ``RewardActor.score_group``: one encode per group, every candidate's prompts
decoded on that embedding in same-length batches (or, with ``--pad-to N``, prompts padded to N
tokens so a group is one batch). Both run in this process, on the same images,
completions and SAM2 weights, alternating group by group so machine noise hits both alike; both
include parsing and scoring. The ratio (b)/(a) is bounded by G, the encodes saved per group.
It is given on wall time and on process CPU time; with one thread the CPU-time ratio is the one a
busy machine does not distort. ``--duplicates``: groups where that share of the answers repeats
one answer's prompts (a converged policy's), which (b) decodes and scores once and (a) does not.
The last line is JSON: ``ratio_over_G_G{G}_dup{percent}`` (and its CPU-time twin) for every run,
and ``ratio_over_G_dup{percent}`` for G = 8.

Defaults: the tiny random SAM2 (hiera-tiny at 256 px) on CPU, synthetic 768 px COD images (the
stored record size) and plausible completions (a jittered box around the object, two boxes in
every fourth, 1-4 points), one torch thread. The two methods' rewards must agree to 1e-4 (a
batched decode may flip a pixel whose logit lies within ~1e-7 of the threshold); the script prints
the largest difference, or fails. With ``--pad-to`` the masks are no longer ``predict``'s (padding
tokens take part in attention, docs/reward.md): the difference is printed, not checked.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from actors.reward import RewardActor, RewardSettings
from segr1.core.parser import parse_completion
from segr1.core.prompts import answer_text
from segr1.core.rewards import score
from segr1.core.schema import Completion, PromptItem, RolloutGroup
from segr1.data.synth import synth_record
from segr1.segmenters.settings import Sam2Settings


@dataclass
class Phases:
    """Seconds per phase over a run of one method."""

    encode_s: float = 0.0
    decode_s: float = 0.0
    other_s: float = 0.0  # parse, score, reading the inputs
    group_s: list[float] = field(default_factory=list)
    group_cpu_s: list[float] = field(default_factory=list)  # process CPU time: robust to a busy machine

    @property
    def total_s(self) -> float:
        return sum(self.group_s)


def completions_for(mask: np.ndarray, rng: np.random.Generator, count: int, duplicates: float = 0.0) -> list[str]:
    """Plausible answers: one box (two for every fourth) jittered around the object, 1-4 points.
    ``duplicates``: the share of the group that repeats the first answer's prompts (a converged
    policy's), each with its own reasoning text."""
    rows, cols = np.nonzero(mask)
    box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=float)
    spread = 0.05 * max(mask.shape)
    texts = []
    for i in range(count):
        boxes = box + rng.normal(0, spread, (2 if i % 4 == 3 else 1, 4))
        n = int(rng.integers(1, 5))
        points = np.column_stack([rng.uniform(box[0], box[2], n), rng.uniform(box[1], box[3], n)])
        texts.append(answer_text(boxes=boxes, points=points, labels=rng.integers(0, 2, n), think="reasoning"))
    repeats = round(duplicates * count)
    answer = texts[0].split("</think>", 1)[1]
    return texts[:1] + [f"<think>reasoning {i}</think>{answer}" for i in range(repeats)] + texts[1 + repeats :]


def per_sample(predictor, image: np.ndarray, gt: np.ndarray, texts: list[str], phases: Phases) -> list[float]:
    """The paper's loop: set_image for every sample, one predict per box, masks OR-ed."""
    size = (image.shape[1], image.shape[0])
    rewards = []
    for text in texts:
        t0 = time.perf_counter()
        ps = parse_completion(text, size)
        mask = np.zeros(gt.shape, bool)
        t1 = time.perf_counter()
        if not ps.is_empty:
            predictor.set_image(image)
        t2 = time.perf_counter()
        requests = [(box, ((ps.points >= box[:2]) & (ps.points <= box[2:])).all(axis=1)) for box in ps.boxes]
        if len(ps.boxes) == 0 and len(ps.points):
            requests = [(None, np.ones(len(ps.points), bool))]
        for box, inside in requests:
            points = ps.points[inside]
            masks, _, _ = predictor.predict(
                point_coords=points if len(points) else None,
                point_labels=ps.labels[inside] if len(points) else None,
                box=box,
                multimask_output=False,
            )
            mask |= masks[0].astype(bool)
        t3 = time.perf_counter()
        rewards.append(score(ps, mask, gt).total)
        t4 = time.perf_counter()
        phases.encode_s += t2 - t1
        phases.decode_s += t3 - t2
        phases.other_s += (t1 - t0) + (t4 - t3)
    return rewards


def per_group(actor: RewardActor, group: RolloutGroup, gt: np.ndarray, phases: Phases) -> list[float]:
    before = actor.stats.as_dict()
    rewards = [s.reward for s in actor.score_group(group, gt)]
    after = actor.stats.as_dict()
    delta = {k: after[k] - before[k] for k in ("read_s", "parse_s", "encode_s", "decode_s", "score_s")}
    phases.encode_s += delta["encode_s"]
    phases.decode_s += delta["decode_s"]
    phases.other_s += delta["read_s"] + delta["parse_s"] + delta["score_s"]
    return rewards


def run(
    actor: RewardActor, records: list, group_size: int, seed: int, duplicates: float = 0.0
) -> tuple[Phases, Phases, float]:
    predictor = actor.segmenter.predictor
    rng = np.random.default_rng(seed)
    a, b = Phases(), Phases()
    max_diff = 0.0
    for i, rec in enumerate(records):
        texts = completions_for(rec.mask, rng, group_size, duplicates)
        item = PromptItem(group_id=f"g{i}", record_id=rec.id, prompt="", image=rec.image, policy_size=rec.size)
        group = RolloutGroup(item, [0], [Completion([0], t, [0.0], "stop") for t in texts], weight_version=0)
        # Alternate which goes first so a slow moment of a shared machine does not favour one method.
        order = ("a", "b") if i % 2 == 0 else ("b", "a")
        results = {}
        for method in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            if method == "a":
                results["a"] = per_sample(predictor, rec.image, rec.mask, texts, a)
            else:
                results["b"] = per_group(actor, group, rec.mask, b)
            phases = a if method == "a" else b
            phases.group_s.append(time.perf_counter() - start)
            phases.group_cpu_s.append(time.process_time() - start_cpu)
        max_diff = max(max_diff, float(np.max(np.abs(np.subtract(results["a"], results["b"])))))
    return a, b, max_diff


def _shares(p: Phases) -> str:
    total = p.total_s
    return f"enc {100 * p.encode_s / total:4.1f}%  dec {100 * p.decode_s / total:4.1f}%  other {100 * p.other_s / total:4.1f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--groups", type=int, default=6, help="timed groups per group size")
    parser.add_argument("--duplicates", type=float, nargs="+", default=[0.0, 0.5, 0.9],
                        help="shares of each group repeating one answer's prompts (a converged policy's)")
    parser.add_argument("--image-size", type=int, default=768, help="record (and policy) image size, px")
    parser.add_argument("--sam2-image-size", type=int, default=256)
    parser.add_argument("--sam2-config", default=None, help="with --sam2-checkpoint: a real SAM2")
    parser.add_argument("--sam2-checkpoint", default=None)
    parser.add_argument("--decode-chunk", type=int, default=0, help="0: the device default")
    parser.add_argument("--pad-to", type=int, default=0, help="pad prompts to N tokens (0: exact batching)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true")
    # One thread: what a Ray actor with one CPU gets (Ray sets OMP_NUM_THREADS=1), and on a shared
    # machine two spinning OpenMP threads measure contention rather than the code.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sam2_checkpoint:
        config, checkpoint, sam2_size = args.sam2_config, args.sam2_checkpoint, args.sam2_image_size or None
    else:
        from segr1.testing.tiny import build_sam2

        tiny = build_sam2(image_size=args.sam2_image_size)
        config, checkpoint, sam2_size = tiny.config, str(tiny.checkpoint), tiny.image_size
    sam2 = Sam2Settings(config=config, checkpoint=checkpoint, image_size=sam2_size)
    settings = RewardSettings(bf16=args.bf16, decode_chunk=args.decode_chunk, decode_pad_to=args.pad_to)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    actor = RewardActor(sam2, settings, name="bench", device=args.device)
    records = [synth_record(i, size=args.image_size) for i in range(args.groups + 1)]
    print(
        f"SAM2 {config} at {sam2_size or 'config'} px on {actor.device}, bf16={args.bf16}, "
        f"decode chunk {actor.segmenter.chunk_size}, pad to {args.pad_to}, torch threads {torch.get_num_threads()}, "
        f"images {args.image_size}x{args.image_size}, {args.groups} groups per G"
    )
    run(actor, records[:1], 2, seed=99)  # warm-up: lazy imports, allocator, first-call overheads
    print(f"{'G':>3} {'dup':>4} {'per-sample g/s':>15} {'per-group g/s':>14} {'ratio':>6} {'ratio/G':>8} "
          f"{'cpu ratio':>10} {'cpu r/G':>8}   wall-time shares")
    timings = actor.segmenter.timings
    figures: dict[str, float] = {}
    for g in args.group_sizes:
        for dup in args.duplicates:
            prompts_before, batches_before = timings.decoded, timings.batches
            a, b, max_diff = run(actor, records[1:], g, seed=g, duplicates=dup)
            per_batch = (timings.decoded - prompts_before) / max(timings.batches - batches_before, 1)
            # Batched matmuls may move a logit by ~1e-7 and flip a pixel that sits on the threshold;
            # anything beyond a few such pixels would be a real disagreement.
            if max_diff > 1e-4 and not args.pad_to:
                raise SystemExit(f"G={g}, {dup:.0%} duplicates: the two methods' rewards differ by up to {max_diff}")
            rate_a = len(a.group_s) / a.total_s
            rate_b = len(b.group_s) / b.total_s
            ratio = rate_b / rate_a
            cpu_ratio = sum(a.group_cpu_s) / sum(b.group_cpu_s)
            figures[f"ratio_over_G_G{g}_dup{round(100 * dup)}"] = round(ratio / g, 3)
            figures[f"cpu_ratio_over_G_G{g}_dup{round(100 * dup)}"] = round(cpu_ratio / g, 3)
            print(f"{g:>3} {dup:>4.0%} {rate_a:>15.3f} {rate_b:>14.3f} {ratio:>6.2f} {ratio / g:>8.2f} "
                  f"{cpu_ratio:>10.2f} {cpu_ratio / g:>8.2f}   per-sample: {_shares(a)} | per-group: {_shares(b)}  "
                  f"(prompts decoded {timings.decoded - prompts_before}, per decoder batch {per_batch:.1f}, "
                  f"max reward diff {max_diff:.1e})")
    if 8 in args.group_sizes:  # the names: G = 8
        figures.update({f"ratio_over_G_dup{round(100 * d)}": figures[f"ratio_over_G_G8_dup{round(100 * d)}"]
                        for d in args.duplicates})
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
