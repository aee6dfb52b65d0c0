"""Can the tiny policy localise at all? Supervised on the true boxes, per kind of synthetic scene.

    .venv/bin/python benchmarks/localisation.py [--steps 400] [--records 1024] [--out runs/localisation]

For each kind of scene (camouflage and salient, each plain and position-coded, ``segr1.data.synth``)
it warm-starts the tiny random Qwen2.5-VL with ``python -m segr1.sft`` on the *true* boxes and
points, then answers 64 held-out scenes greedily (Hugging Face ``generate``) and scores the answers
with the ``box`` segmenter. Beside each it prints the baseline: the image-blind box, the one box
best on average over the training scenes, scored on the same held-out scenes. A policy that looks
at the image beats it; one that learned only where objects tend to be matches it at best. The
number of distinct answers over the held-out scenes shows the same from the other side.

This is what decides the scenes of ``benchmarks/learning.py``: GRPO can only teach a policy to look
if the policy is able to look. About 5 min per kind on a 2-core machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from learning import HELDOUT, blind_box, blind_scores

SIZE = 112
SCENES = (("camouflage", False), ("camouflage", True), ("salient", False), ("salient", True))


def supervised(model: Path, data: Path, out: Path, args: argparse.Namespace) -> Path:
    """``segr1.train.sft`` on the true answers in a child process; returns the exported policy."""
    exported = out / "policy_hf"
    pixels = str(SIZE * SIZE)
    command = [
        sys.executable, "-m", "segr1.sft", "--model", str(model), "--data", str(data),
        "--output", str(out / "sft"), "--steps", str(args.steps), "--batch-size", "16",
        "--micro-batch-size", "16", "--lr", "1e-3", "--export", str(exported), "--seed", str(args.seed),
        "--min-pixels", pixels, "--max-pixels", pixels, "--dtype", "float32",
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return exported


def greedy_scores(policy: Path, records: list) -> tuple[float, int]:
    """Mean IoU of the greedy answers (box segmenter) and how many distinct answers there were."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from learner.inputs import load_processor, process_prompt
    from segr1.core.metrics import iou
    from segr1.core.parser import parse_completion
    from segr1.core.prompts import build_messages, render_prompt
    from segr1.core.segment import BoxSegmenter, masks_for_group

    processor = load_processor(str(policy), SIZE * SIZE, SIZE * SIZE)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(policy), dtype=torch.float32).eval()
    segmenter = BoxSegmenter(point_radius=8.0)  # the radius its recorded figures used
    ious, answers = [], set()
    for record in records:
        inputs = process_prompt(processor, render_prompt(processor, build_messages(record.task)), record.image, record.id)
        with torch.no_grad():
            out = model.generate(
                input_ids=inputs.input_ids[None], attention_mask=torch.ones_like(inputs.input_ids)[None],
                mm_token_type_ids=inputs.mm_token_type_ids[None], pixel_values=inputs.pixel_values,
                image_grid_thw=inputs.image_grid_thw, max_new_tokens=96, do_sample=False,
            )
        text = processor.tokenizer.decode(out[0, len(inputs.input_ids) :], skip_special_tokens=True)
        answers.add(text)
        prompt_set = parse_completion(text, (SIZE, SIZE))
        mask = masks_for_group(segmenter, segmenter.embed(record.image), [prompt_set], (SIZE, SIZE), (SIZE, SIZE))[0]
        ious.append(iou(mask, record.mask))
    return float(np.mean(ious)), len(answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/localisation"))
    parser.add_argument("--records", type=int, default=1024, help="training scenes per kind")
    parser.add_argument("--steps", type=int, default=400, help="SFT steps of 16 scenes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from segr1.data import synth_records, write_synth
    from segr1.testing.tiny import build_qwen

    model = build_qwen(seed=args.seed)
    rows = []
    for kind, coded in SCENES:
        started = time.monotonic()
        name = kind + ("-xy" if coded else "")
        out = args.out / name
        write_synth(out / "data", args.records, SIZE, args.seed, kind=kind, position_code=coded, overwrite=True)
        heldout = list(synth_records(HELDOUT, SIZE, args.seed + 10_000, kind=kind, position_code=coded))
        policy = supervised(model, out / "data", out, args)
        policy_iou, distinct = greedy_scores(policy, heldout)
        train_masks = np.stack([r.mask for r in synth_records(args.records, SIZE, args.seed, kind=kind)])
        blind = blind_scores(blind_box(train_masks), np.stack([r.mask for r in heldout]))["iou"]
        rows.append((name, policy_iou, blind, distinct, time.monotonic() - started))
        print(f"{name}: held-out IoU {policy_iou:.3f} (image-blind box {blind:.3f}), "
              f"{distinct} distinct answers, {rows[-1][-1] / 60:.1f} min", flush=True)

    print(f"\nSFT on the true answers, {args.steps} steps x 16 of {args.records} scenes, "
          f"greedy on {HELDOUT} held-out scenes (box segmenter)")
    print(f"{'scenes':<16}{'policy IoU':>12}{'blind box':>12}{'policy/blind':>14}{'distinct':>10}")
    for name, policy_iou, blind, distinct, _ in rows:
        print(f"{name:<16}{policy_iou:>12.3f}{blind:>12.3f}{policy_iou / blind:>14.2f}{distinct:>10}")


if __name__ == "__main__":
    main()
