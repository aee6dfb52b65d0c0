"""Experiment tracking beyond TensorBoard: a Weights & Biases run and an MLflow run, when the job's
``monitor.wandb`` / ``monitor.mlflow`` ask for them. ``Monitor`` hands each tracker what it gives
TensorBoard (every step's scalars) and the job's config at start, and ends the runs with the job.

Both packages are the optional ``tracking`` extra; asking for a tracker without it installed
stops the job at start, naming the setting and the install.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Protocol

from segr1.config import MlflowSettings, MonitorSettings, WandbSettings

log = logging.getLogger("segr1")

INSTALL = "install the tracking extra: pip install 'segr1[tracking]'"
MLFLOW_BATCH = 100  # MLflow's limit of parameters per log_batch call


class TrackingError(RuntimeError):
    """A configured tracker could not start (not installed, refused its settings)."""


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self, failed: bool) -> None: ...


def open_trackers(settings: MonitorSettings, out_dir: Path, config: dict[str, Any]) -> list[Tracker]:
    """The trackers ``settings`` turns on, each started with ``config``; none by default."""
    trackers: list[Tracker] = []
    try:
        if settings.wandb is not None:
            trackers.append(WandbTracker(settings.wandb, out_dir, config, quiet=not settings.verbose))
        if settings.mlflow is not None:
            trackers.append(MlflowTracker(settings.mlflow, config))
    except BaseException:
        for tracker in trackers:
            tracker.close(failed=True)
        raise
    return trackers


class WandbTracker:
    def __init__(self, settings: WandbSettings, out_dir: Path, config: dict[str, Any], quiet: bool) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise TrackingError(f"monitor.wandb is set but wandb is not importable ({exc}): {INSTALL}") from exc
        directory = Path(settings.dir) if settings.dir else out_dir
        directory.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=settings.project, entity=settings.entity, name=settings.name, mode=settings.mode,
                dir=str(directory), tags=list(settings.tags), config=config, reinit="create_new",
                # segr1 keeps the console's output in <run>/logs; wandb's copy of it would be a third
                settings=wandb.Settings(console="off", silent=quiet),
            )
        except Exception as exc:  # noqa: BLE001 - wandb raises many kinds; all mean "not started"
            raise TrackingError(f"monitor.wandb (project {settings.project!r}, mode {settings.mode!r}): "
                                f"wandb could not start a run: {exc}") from exc
        where = self.run.url if settings.mode == "online" else self.run.dir  # offline runs have no URL
        log.info("W&B run %s (%s): %s", self.run.name, settings.mode, where)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    def __init__(self, settings: MlflowSettings, config: dict[str, Any]) -> None:
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Param
        except ImportError as exc:
            raise TrackingError(f"monitor.mlflow is set but mlflow is not importable ({exc}): {INSTALL}") from exc
        where = f"monitor.mlflow (tracking_uri {settings.tracking_uri or '$MLFLOW_TRACKING_URI'!s}, " \
                f"experiment {settings.experiment!r})"
        try:  # the client, not mlflow's global state: tests and notebooks run several jobs in one process
            self.client = MlflowClient(tracking_uri=settings.tracking_uri)
            experiment = self.client.get_experiment_by_name(settings.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(settings.experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=settings.run_name).info.run_id
            params = [Param(key, str(value)) for key, value in flat_params(config).items()]
            for start in range(0, len(params), MLFLOW_BATCH):
                self.client.log_batch(self.run_id, params=params[start : start + MLFLOW_BATCH])
        except Exception as exc:  # noqa: BLE001 - MlflowException, connection errors: all "not started"
            raise TrackingError(f"{where}: MLflow could not start a run: {exc}") from exc
        log.info("MLflow run %s in experiment %r at %s", self.run_id, settings.experiment,
                 self.client.tracking_uri)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config sections as MLflow parameters: ``{"rollout.group_size": 4, ...}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, f"{name}."))
        else:
            flat[name] = value
    return flat
