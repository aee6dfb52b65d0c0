"""What a running job shows: one log line and a progress bar per step, JSONL and TensorBoard logs,
Ray metrics for the dashboard, W&B and MLflow runs when configured, and sample pictures every few
steps."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from segr1.config import MonitorSettings
from segr1.core.draw import panel
from segr1.core.files import move_into_place, write_atomic
from segr1.train.tracking import Tracker, open_trackers

log = logging.getLogger("segr1")

# The figures of the one-line summary, in order; everything else goes to the files and the dashboard.
HEADLINE = ("reward", "iou", "kl", "loss", "step_s", "samples_per_s", "weight_version", "rollout_engines", "eval_reward",
            "eval_iou")


@dataclass
class SampleView:
    """One completion worth looking at: the picture's inputs and the text the policy wrote."""

    group_id: str
    image: np.ndarray
    gt_mask: np.ndarray
    pred_mask: np.ndarray
    boxes: np.ndarray
    points: np.ndarray
    labels: np.ndarray
    policy_size: tuple[int, int]
    text: str
    reward: float


class Monitor:
    """The run's figures under ``out_dir`` (metrics.jsonl, tensorboard/, samples/), the console's
    progress bar, and the trackers ``settings`` turns on, started with ``config`` (the job's)."""

    def __init__(
        self, out_dir: Path, total_steps: int, ray_metrics: bool = True,
        settings: MonitorSettings = MonitorSettings(), config: dict[str, Any] | None = None,
    ) -> None:
        self.out_dir = out_dir
        self.total_steps = total_steps
        out_dir.mkdir(parents=True, exist_ok=True)
        self._trackers: list[Tracker] = open_trackers(settings, out_dir, config or {})  # first: may refuse
        self._jsonl = open(self._jsonl_path, "a", buffering=1)
        self._tb = _tensorboard(out_dir / "tensorboard")
        self._gauges: dict[str, Any] = {}
        self._ray_metrics = ray_metrics
        self._progress: Any = None

    @property
    def _jsonl_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def start(self, step: int = 0) -> None:
        """Draw the progress bar from ``step`` on: when training starts, not through the roles'
        start-up. Only on a terminal: in a log file (``ray job logs``) the step lines say it all,
        and a bar redrawn with carriage returns is one endless line there."""
        if self._progress is None:
            self._progress = tqdm(total=self.total_steps, initial=step, desc="train", unit="step",
                                  dynamic_ncols=True, disable=None)

    @property
    def _bar(self) -> Any:
        self.start()
        return self._progress

    def resume_at(self, step: int) -> None:
        """Continue the logs of a run resumed from its step ``step`` checkpoint.

        The stopped run may have logged steps past that checkpoint, which the resumed run logs
        again: metrics.jsonl is rewritten without records after ``step`` (to a temporary file,
        then renamed, so a crash here loses nothing), and TensorBoard starts a new event file with
        ``purge_step`` so its readers drop the older events of those steps. Records of ``step``
        itself (its train record and any eval record logged with ``advance=False``) stay.
        """
        kept = _lines_up_to(self._jsonl_path, step)
        self._jsonl.close()
        write_atomic(self._jsonl_path, "".join(kept))
        self._jsonl = open(self._jsonl_path, "a", buffering=1)
        if self._tb is not None:
            self._tb.close()
            self._tb = _tensorboard(self.out_dir / "tensorboard", purge_step=step + 1)
        if self._progress is not None:
            self._progress.n = step
            self._progress.refresh()

    def log_step(self, step: int, metrics: dict[str, float], advance: bool = True) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        scalars = {name: float(value) for name, value in record.items()
                   if isinstance(value, (int, float)) and name != "step"}
        for name, value in scalars.items():
            if self._tb is not None:
                self._tb.add_scalar(name, value, step)
            self._gauge(name, value)
        for tracker in self._trackers:
            tracker.log(step, scalars)
        if advance:
            self._bar.update(1)
        self._bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("reward", "kl") if k in metrics})
        log.info("step %d %s", step, " ".join(f"{k}={metrics[k]:.4g}" for k in HEADLINE if k in metrics))

    def save_samples(self, step: int, samples: list[SampleView]) -> Path:
        """Pictures and texts of a few samples under ``samples/step_<n>/``, written then renamed."""
        final = self.out_dir / "samples" / f"step_{step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        index = []
        for i, sample in enumerate(samples):
            picture = panel(sample.image, sample.gt_mask, sample.pred_mask, sample.boxes,
                            sample.points, sample.labels, sample.policy_size)
            picture.save(tmp / f"{i}.png")
            index.append({"file": f"{i}.png", "group_id": sample.group_id, "reward": sample.reward,
                          "completion": sample.text})
        (tmp / "samples.json").write_text(json.dumps(index, indent=1))
        move_into_place(tmp, final)  # a resumed run redoing this step replaces the older pictures
        return final

    def flush(self) -> None:
        """Everything logged so far on disk (before the files are copied elsewhere)."""
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close_bar(self) -> None:
        """The bar's last state printed and put away, so lines after it (the summary) stand alone."""
        if self._progress is not None:
            self._progress.close()

    def close(self, failed: bool = False) -> None:
        """Close the files and end the trackers' runs (``failed``: the job ended with an error)."""
        self.close_bar()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            tracker.close(failed)

    def _gauge(self, name: str, value: float) -> None:
        if not self._ray_metrics:
            return
        from ray.util.metrics import Gauge

        metric = "segr1_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)
        if metric not in self._gauges:
            self._gauges[metric] = Gauge(metric, description=f"segr1 {name}")
        self._gauges[metric].set(value)


def _tensorboard(path: Path, purge_step: int | None = None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency; this only guards broken installs
        log.warning("tensorboard is not importable; writing JSONL logs only")
        return None
    return SummaryWriter(str(path), purge_step=purge_step)


def _lines_up_to(path: Path, step: int) -> list[str]:
    """The lines of a metrics.jsonl whose records are of ``step`` or earlier.

    A last line that does not parse is the one a killed driver was writing and is dropped; any
    other unreadable line means the file is not a metrics log, and is an error.
    """
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            record_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(lines):
                log.warning("%s: dropping its torn last line %d", path, number)
                continue
            raise ValueError(f"{path}: line {number} is not a metrics record ({exc})") from exc
        if record_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")  # the next record starts a line
    return kept


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value

