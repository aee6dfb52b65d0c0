"""The end of a run: a short summary for the console and ``reward_curve.png``, both from the run's
metrics.jsonl (the whole run, a resumed one's earlier steps included).

The curve is drawn with PIL, a dependency of the job already (matplotlib is a dev tool here):
each step's mean reward, its running mean over ``WINDOW`` steps, and the held-out reward where
the run evaluated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WINDOW = 10  # steps in the summary's "first" and "last" means and in the curve's running mean
# Each step's count of what went wrong in the rollout and reward pools (the trainer logs them).
ACCOUNTING = ("actor_restarts", "calls_past_deadline", "groups_redone")
SIZE = (900, 420)
MARGIN = (70, 40, 20, 50)  # left, top, right, bottom
RAW_COLOR = (160, 190, 230)
MEAN_COLOR = (20, 70, 160)
EVAL_COLOR = (230, 120, 20)
AXIS_COLOR = (60, 60, 60)
GRID_COLOR = (225, 225, 225)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a killed writer's) is skipped."""
    if not path.exists():
        return []
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number != len(lines):
                raise ValueError(f"{path}: line {number} is not a metrics record ({exc})") from exc
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``, one value per step: the last record of a step wins."""
    by_step = {int(r["step"]): float(r[key]) for r in records if isinstance(r.get(key), (int, float))}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


@dataclass(frozen=True)
class RewardTrend:
    steps: int
    first: float  # mean reward of the first ``window`` steps
    last: float  # ... and of the last ``window``
    window: int

    @classmethod
    def of(cls, records: list[dict]) -> RewardTrend | None:
        _, rewards = series(records, "reward")
        if not rewards:
            return None
        window = min(WINDOW, max(1, len(rewards) // 2))  # a short run: its halves, not one window twice
        return cls(len(rewards), float(np.mean(rewards[:window])), float(np.mean(rewards[-window:])), window)


def run_summary(
    records: list[dict], step: int, total_steps: int, wall_s: float, places: dict[str, str],
    resumed_from: int | None = None, engines: dict[str, dict] | None = None,
) -> str:
    """The lines the job prints at its end: steps, reward first -> last, wall time, faults, the
    groups each rollout engine made in this process (``engines``: the pool's stats; an elastic
    run's engines come and go) and where each of the run's outputs is (``places``: name ->
    location, in order)."""
    done = f"{step} of {total_steps} steps" if step < total_steps else f"{step} steps"
    if resumed_from:
        done += f" (resumed at step {resumed_from})"
    lines = [f"run summary: {done} in {duration(wall_s)}"]
    trend = RewardTrend.of(records)
    if trend is None:
        lines.append("  reward: no training step logged")
    else:
        lines.append(f"  reward: {trend.first:.4g} (mean of the first {trend.window}) -> {trend.last:.4g} "
                     f"(mean of the last {trend.window})")
    restarts, late, redone = (int(sum(series(records, key)[1])) for key in ACCOUNTING)
    lines.append(f"  faults: {restarts} actor restart(s), {late} call(s) past their deadline, "
                 f"{redone} group(s) redone")
    if engines:
        made = [f"{name}{' (gone)' if stats.get('retired') else ''} {int(stats['groups'])}" for name, stats in engines.items()]
        lines.append(f"  rollout engines (groups made): {', '.join(made)}")
    width = max(len(name) for name in places) if places else 0
    lines += [f"  {name.ljust(width)}  {where}" for name, where in places.items()]
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """``3h02m``, ``4m05s``, ``12.3s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def running_mean(values: list[float], window: int = WINDOW) -> list[float]:
    """The mean of each value and the up to ``window - 1`` values before it."""
    sums = np.cumsum([0.0, *values])
    return [float((sums[i + 1] - sums[max(0, i + 1 - window)]) / min(window, i + 1)) for i in range(len(values))]


def draw_reward_curve(records: list[dict], path: Path) -> Path | None:
    """``path`` as a PNG of the reward per step (None, nothing written: no training step logged)."""
    steps, rewards = series(records, "reward")
    if not steps:
        return None
    eval_steps, eval_rewards = series(records, "eval_reward")
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    low, high = _value_range(rewards + eval_rewards)
    plot = _Plot(steps[0], max(steps[-1], steps[0] + 1), low, high)
    plot.axes(draw, font)
    plot.line(draw, steps, rewards, RAW_COLOR, 1)
    plot.line(draw, steps, running_mean(rewards), MEAN_COLOR, 3)
    for s, value in zip(eval_steps, eval_rewards):
        x, y = plot.xy(s, value)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=EVAL_COLOR)
    legend = [("reward per step", RAW_COLOR), (f"running mean of {WINDOW}", MEAN_COLOR)]
    legend += [("held-out reward", EVAL_COLOR)] if eval_steps else []
    x = MARGIN[0]
    for label, color in legend:
        draw.rectangle([x, 14, x + 18, 24], fill=color)
        draw.text((x + 24, 12), label, fill=AXIS_COLOR, font=font)
        x += 40 + int(draw.textlength(label, font=font))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _value_range(values: list[float]) -> tuple[float, float]:
    """The y-axis range: the values' own, padded, never empty (a run whose reward never moved)."""
    low, high = min(values), max(values)
    if math.isclose(low, high):
        return low - 0.5, high + 0.5
    pad = (high - low) * 0.05
    return low - pad, high + pad


@dataclass(frozen=True)
class _Plot:
    """Steps and values to pixels inside the margins."""

    first: int
    last: int
    low: float
    high: float

    def xy(self, step: float, value: float) -> tuple[float, float]:
        left, top, right, bottom = MARGIN
        width, height = SIZE[0] - left - right, SIZE[1] - top - bottom
        x = left + (step - self.first) / (self.last - self.first) * width
        y = top + (self.high - value) / (self.high - self.low) * height
        return x, y

    def line(self, draw: ImageDraw.ImageDraw, steps: list[int], values: list[float], color: tuple, width: int) -> None:
        points = [self.xy(s, v) for s, v in zip(steps, values)]
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse([x - width - 1, y - width - 1, x + width + 1, y + width + 1], fill=color)
        else:
            draw.line(points, fill=color, width=width, joint="curve")

    def axes(self, draw: ImageDraw.ImageDraw, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> None:
        left, top, right, bottom = MARGIN
        x0, x1, y0, y1 = left, SIZE[0] - right, top, SIZE[1] - bottom
        for value in _ticks(self.low, self.high, 5):
            _, y = self.xy(self.first, value)
            draw.line([x0, y, x1, y], fill=GRID_COLOR)
            draw.text((x0 - 8, y), f"{value:.6g}", fill=AXIS_COLOR, font=font, anchor="rm")
        for step in _ticks(self.first, self.last, 6, whole=True):
            x, _ = self.xy(step, self.low)
            draw.line([x, y1, x, y1 + 4], fill=AXIS_COLOR)
            draw.text((x, y1 + 6), str(step), fill=AXIS_COLOR, font=font, anchor="ma")
        draw.rectangle([x0, y0, x1, y1], outline=AXIS_COLOR)
        draw.text(((x0 + x1) / 2, SIZE[1] - 6), "step", fill=AXIS_COLOR, font=font, anchor="md")
        draw.text((8, y0 - 4), "reward", fill=AXIS_COLOR, font=font, anchor="ld")


def _ticks(low: float, high: float, count: int, whole: bool = False) -> list[float]:
    """About ``count`` round values (1, 2 or 5 times a power of ten apart) from ``low`` to ``high``;
    ``whole``: integers only (steps)."""
    raw = max(high - low, 1e-12) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    spacing = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    if whole:
        spacing = max(1, round(spacing))
    first = math.ceil(low / spacing - 1e-9)
    ticks = [round(i * spacing, 12) for i in range(first, math.floor(high / spacing + 1e-9) + 1)]
    return [int(t) for t in ticks] if whole else ticks
