"""SFT warm start: teach the policy the answer format before GRPO (the paper's optional first stage).

    python -m segr1.sft --model DIR --data SHARDS --output CKPT_DIR [--steps N] [--export HF_DIR]

Its settings are the training job's configuration (``--config``, none by default, plus dotted
overrides): the short flags are aliases of its keys (``--model`` is ``model.path``, ``--data``
``data.train``, ``--output`` ``trainer.output_dir``), the learner is the ``learner`` section, and
``sft`` holds SFT's own (steps, batch size, learning rate, ...).

Each record becomes (image, task prompt, canonical answer): a box around the ground-truth mask,
two points inside it and one outside, written by ``segr1.core.prompts.answer_text`` in the format the
parser reads back. ``--random-coords`` keeps the format but draws every coordinate at random, so a
policy learns to *write* answers without learning *where* objects are (the learning benchmark
starts from there to show that GRPO, not SFT, finds the objects). The loss is the mean negative
log-likelihood of the answer tokens (and the closing end-of-turn token) only.

Answers are written in the frame the policy sees each image in: the image as the processor
resizes it under ``--min-pixels``/``--max-pixels`` (``segr1.core.frames``), the bounds the export keeps.

It runs one learner rank in this process, with the same engine, settings and checkpoint format
as GRPO training (a run can resume from it with ``--resume``). Progress is one JSON line per step;
the run ends with a Hugging Face export (``OUTPUT/export`` unless ``--export`` says otherwise).
"""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from segr1.config import Config, command_parser, parse_command, resolve_model
from segr1.config.tools import Alias, ConfigError
from segr1.core.frames import processor_bounds, to_policy_frame
from segr1.core.prompts import TEXT_TASKS, PromptRenderer, answer_format, answer_text
from segr1.core.schema import TrainSample


def answer_for_mask(
    mask: np.ndarray, task: str, rng: np.random.Generator, policy_size: tuple[int, int]
) -> str | None:
    """The canonical answer for a ground-truth mask: its box, 2 points on it, 1 beside it.

    Positive points are the object pixel nearest the mask's centroid and one random object pixel;
    the negative point is a random background pixel (inside the box when there is one, so it
    teaches where the object ends). None for an empty mask: there is nothing to point at.
    Coordinates are written in ``policy_size``, the frame the policy sees the image in
    (``segr1.core.frames``), so the reward reads them back onto these very pixels.
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    fmt = answer_format(task)
    cx, cy = xs.mean(), ys.mean()
    centre = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
    other = int(rng.integers(len(xs)))
    x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    background = ~mask
    in_box = np.zeros_like(mask)
    in_box[y1 : y2 + 1, x1 : x2 + 1] = True
    candidates = np.argwhere(background & in_box)
    if len(candidates) == 0:
        candidates = np.argwhere(background)
    points = [[xs[centre], ys[centre]], [xs[other], ys[other]]]
    labels = [1, 1]
    if len(candidates):
        by, bx = candidates[int(rng.integers(len(candidates)))]
        points.append([bx, by])
        labels.append(0)
    height, width = mask.shape
    frame = lambda xy: to_policy_frame(np.asarray(xy, dtype=np.float64), (width, height), policy_size)  # noqa: E731
    think = None
    if fmt.think:
        centre_x, centre_y = frame([cx, cy])
        think = (
            f"The object is around ({int(centre_x)},{int(centre_y)}) and covers about "
            f"{100 * len(xs) / (height * width):.0f}% of the image."
        )
    box = [frame([x1, y1, x2, y2])] if fmt.boxes else None
    return answer_text(boxes=box, points=frame(points), labels=labels, think=think)


def random_answer(policy_size: tuple[int, int], task: str, rng: np.random.Generator) -> str:
    """An answer in the right format whose coordinates (in the policy's frame) have nothing to do
    with the image."""
    width, height = policy_size
    fmt = answer_format(task)
    xa, xb = sorted(rng.integers(0, width, 2).tolist())
    ya, yb = sorted(rng.integers(0, height, 2).tolist())
    count = int(rng.integers(1, 4))
    points = np.stack([rng.integers(0, width, count), rng.integers(0, height, count)], axis=1)
    labels = rng.integers(0, 2, count)
    labels[0] = 1
    think = "Let me look at the image and find the object." if fmt.think else None
    return answer_text(boxes=[[xa, ya, xb, yb]] if fmt.boxes else None, points=points, labels=labels, think=think)


def sft_samples(records, processor, random_coords: bool, seed: int) -> Iterator[TrainSample]:
    """Train samples (completion = the answer's tokens + end of turn) from dataset records.

    ``processor`` carries the run's image bounds: answers are written in the frame it resizes
    each image to."""
    tokenizer = processor.tokenizer
    end_of_turn = tokenizer.eos_token_id
    bounds = processor_bounds(processor)
    render = PromptRenderer(processor)
    for record in records:
        rng = np.random.default_rng([seed, zlib.crc32(record.id.encode())])  # same per record on every run
        height, width = record.mask.shape
        policy_size = bounds.frame((width, height))
        if random_coords:
            answer = random_answer(policy_size, record.task, rng)
        else:
            answer = answer_for_mask(record.mask, record.task, rng, policy_size)
            if answer is None:
                continue
        expression = record.texts[0] if record.task in TEXT_TASKS else None
        prompt = render(record.task, expression)
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_of_turn]
        yield TrainSample(
            group_id=record.id, prompt=prompt, image=record.image, completion_ids=ids,
            behavior_logprobs=[0.0] * len(ids), advantage=0.0, weight_version=0,
        )


ALIASES = [
    Alias("--model", "model.path", "Hugging Face model directory (the policy to warm-start), or 'tiny'", text=True),
    Alias("--data", "data.train", "dataset directory of Parquet shards (segr1 data)", text=True),
    Alias("--output", "trainer.output_dir", "checkpoint root (step_N/ + latest): a path or a pyarrow.fs URI",
          text=True),
    Alias("--steps", "sft.steps"),
    Alias("--batch-size", "sft.batch_size", "records per optimizer step"),
    Alias("--lr", "sft.lr"),
    Alias("--warmup-steps", "sft.warmup_steps"),
    Alias("--micro-batch-size", "learner.micro_batch_size"),
    Alias("--zero-stage", "learner.zero_stage"),
    Alias("--dtype", "model.dtype"),
    Alias("--deepspeed-config", "learner.deepspeed_config", "JSON merged over the generated DeepSpeed config",
          text=True),
    Alias("--min-pixels", "model.min_pixels", "image bounds, the rollouts' too"),
    Alias("--max-pixels", "model.max_pixels", "see --min-pixels"),
    Alias("--random-coords", "sft.random_coords", "right format, coordinates unrelated to the object", const=True),
    Alias("--save-every", "sft.save_every", "also checkpoint every N steps (0: only at the end)"),
    Alias("--resume", "trainer.resume", "continue from the latest checkpoint under --output", const=True),
    Alias("--export", "sft.export", "where the final policy goes as a Hugging Face directory (null: OUTPUT/export)",
          text=True),
    Alias("--seed", "trainer.seed"),
]


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("python -m segr1.sft", __doc__.split("\n\n")[0], ALIASES)
    try:
        _, config = parse_command(parser, ALIASES, argv)
        config = replace(config, model=resolve_model(config.model))
    except ConfigError as exc:
        raise SystemExit(f"segr1 sft: {exc}") from None
    if config.data.train == "synthetic":
        raise SystemExit("segr1 sft: data.train (--data) must be a dataset directory of Parquet shards (segr1 data)")
    return train(config)


def train(config: Config) -> int:
    """Supervised steps on ``config.data.train`` into ``config.trainer.output_dir``, then the export."""
    from learner import checkpoint as ckpt
    from learner.inputs import load_processor, plan_micro_batches
    from learner.worker import LearnerRun, LearnerWorker
    from segr1.core.grpo import LossSettings
    from segr1.data.reader import ShardReader
    from segr1.runtime.storage import Storage
    from segr1.weightsync.rendezvous import new_secret

    sft, model, seed = config.sft, config.model, config.trainer.seed
    # SFT's own step size over the learner's settings; no reference model (no KL term).
    settings = replace(config.learner, lr=sft.lr, warmup_steps=sft.warmup_steps, lr_schedule="constant")
    processor = load_processor(model.path, model.min_pixels, model.max_pixels)
    reader = ShardReader(config.data.train, shuffle=True, seed=seed, epochs=None)
    if len(reader) == 0:
        raise SystemExit(f"data.train {config.data.train}: the dataset has no records")
    worker = LearnerWorker(settings, LearnerRun(model, LossSettings(kl_coef=0.0), seed=seed), rank=0, world_size=1)
    secret = new_secret()  # a group of one, in this process: the store still asks for it
    worker.setup(*worker.master_address(secret), secret)
    step = 0
    output = Storage(config.trainer.output_dir).location
    latest = worker.latest_checkpoint(output) if config.trainer.resume else None
    if latest is not None:
        state = worker.load_checkpoint(output, latest)
        step = int(state["step"])
        reader.load_state_dict(state["data"])
    samples = sft_samples(iter(reader), processor, sft.random_coords, seed)

    def save() -> str:
        name = ckpt.step_name(step)
        worker.save_checkpoint(output, name)
        state = {"step": step, "data": reader.state_dict(), "weight_version": 0, "sft": True}
        return worker.publish_checkpoint(output, name, state)

    while step < sft.steps:
        batch = [next(samples) for _ in range(sft.batch_size)]
        metrics = worker.train_step(plan_micro_batches(batch, 1, settings.micro_batch_size)[0], objective="sft")
        step += 1
        print(json.dumps({"step": step, "loss": metrics["loss"], "entropy": metrics["entropy"],
                          "grad_norm": metrics["grad_norm"], "seconds": round(metrics["seconds"], 3)}), flush=True)
        if sft.save_every and step % sft.save_every == 0 and step < sft.steps:
            save()
    print(json.dumps({"checkpoint": save()}), flush=True)
    export = sft.export if sft.export is not None else f"{output}/export"
    print(json.dumps({"export": worker.export_hf(export)}), flush=True)
    worker.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
