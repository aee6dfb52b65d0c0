"""Wiring: from a ``Config`` to running rollout, reward and learner roles and a ``Trainer``.

``actors`` and ``learner`` are imported only from the layers above them: the configuration
(``segr1.config``, whose sections are the roles' settings objects), the driver (``segr1.train``,
``segr1.evaluation``, ``segr1.serving``) and the commands; the import-linter contracts in
``pyproject.toml`` say so.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import ray

from actors.pipeline import IssuedPrompt, Pipeline
from actors.reward import make_reward_pool
from actors.rollout import RolloutPool
from learner.group import LearnerGroup
from learner.inputs import load_processor
from learner.worker import LearnerRun
from segr1.config import Config, config_dict, resolve_model
from segr1.config.tools import write_yaml
from segr1.data import ShardReader, read_manifest, write_synth
from segr1.runtime.deadlines import Deadline
from segr1.runtime.ray_cluster import RoleRequest, connect, place_roles
from segr1.runtime.storage import Storage, StorageError
from segr1.train.console import Console
from segr1.train.monitor import Monitor
from segr1.train.prompt_source import PromptSource
from segr1.train.trainer import LOG_NAMES, Trainer

log = logging.getLogger("segr1")


@dataclass
class Job:
    """Everything a run holds on to, so it can be shut down in one place."""

    trainer: Any
    rollout: Any
    reward: Any
    learner: Any
    monitor: Any
    placements: list[Any]
    owns_cluster: bool
    console: Any = None  # Console: routes the roles' output to <run>/logs until the end

    def shutdown(self, failed: bool = False) -> None:
        """Stop everything the run started; ``failed``: it ended with an error (the trackers' runs
        are marked so)."""
        self.monitor.close(failed=failed)
        for role in (self.rollout, self.reward, self.learner):
            role.shutdown()
        for placement in self.placements:
            placement.remove()
        if self.owns_cluster:
            ray.shutdown()
        if self.console is not None:  # last: the roles' final lines still go to their files
            self.console.close()


class WeightSync:
    """Keeps every rollout engine on the learner's weights: one group, one push per version.

    The learner's ``weight_version`` is the one record of which weights the engines hold (a
    checkpoint saves and restores it); ``version`` reads it. A rollout actor that Ray restarted
    comes back at version 0 and outside the group; before each push the group is re-formed if any
    engine is out of it, so the push reaches everyone.
    """

    def __init__(self, learner: LearnerGroup, rollout: RolloutPool) -> None:
        self.learner = learner
        self.rollout = rollout
        self._form()

    @property
    def version(self) -> int:
        return self.learner.weight_version

    def _form(self) -> None:
        host, port = self.learner.weight_sync_address()
        joins = self.rollout.join_weight_group(host, port, self.learner.secret)  # the store asks for it
        # The learner blocks until every engine has joined; an engine that died instead would
        # leave it waiting for the group's whole timeout, so watch the joins while it waits.
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            sender = pool.submit(self.learner.init_weight_sync, host, port, self.rollout.world_size)
            pending = joins
            while pending:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
                ray.get(done)  # raises the engine's error at once
            self.plan = sender.result()
        finally:
            pool.shutdown(wait=False)  # on error the job's shutdown kills the learner it waits on
        self.address = (host, port)

    def push(self, new: bool = True) -> int:
        """Send the learner's weights to every engine as the next version (``new``), or as the
        current one again (a resumed run's fresh engines, an elastic pool's new ones); returns the
        version. An elastic pool first drops its dead engines and admits the ones that loaded."""
        version = self.version + 1 if new else self.version
        deadline = Deadline(self.rollout.settings.weight_sync_timeout_s, "rollout.weight_sync_timeout_s")
        if self.rollout.elastic:
            self.rollout.refresh(deadline)
        if self.rollout.out_of_sync(self.version, self.address, deadline):
            log.warning("re-forming the weight group: a rollout engine restarted, joined or left")
            self._form()
        receives = self.rollout.receive_weights(self.plan, version)
        sent = self.learner.broadcast_weights(version, list(zip(self.rollout.names, receives)), deadline)
        if version <= 1 or not new:  # how the push goes out; staged bytes were copied before sending
            log.info("weight push of version %d: %.0f MB, %.0f MB of it staged", version,
                     sent["bytes"] / 1e6, sent["staged"] / 1e6)
        self.rollout.open_admitted()
        return version


def role_requests(config: Config, use_gpus: bool) -> list[RoleRequest]:
    """The three roles' requests from the job config; ``use_gpus=False`` on a cluster without GPUs.

    The configs ask for GPUs (the paper's setup); on a CPU-only cluster the caller passes
    ``use_gpus=info.num_gpus > 0`` and the same job runs with CPU-only bundles.
    """
    def gpus(n: float) -> float:
        return float(n) if use_gpus else 0.0

    rollout, reward, learner = config.rollout, config.reward, config.learner
    # An elastic rollout pool places each engine itself, as the cluster gives room.
    engines = [] if rollout.elastic else [
        RoleRequest("rollout", rollout.num_actors, rollout.num_cpus_per_actor, gpus(rollout.num_gpus_per_actor))
    ]
    return [
        *engines,
        RoleRequest("reward", reward.num_actors, reward.num_cpus_per_actor, gpus(reward.num_gpus_per_actor)),
        RoleRequest("learner", learner.num_workers, learner.num_cpus_per_worker, gpus(learner.num_gpus_per_worker)),
    ]


def dataset_dir(config: Config, out_dir: Path, split: str) -> Path | None:
    """The shard directory of ``split``; ``synthetic`` data is generated once under the run."""
    data = config.data
    source = data.train if split == "train" else data.eval
    if source != "synthetic" and not (split == "eval" and source is None and data.train == "synthetic"):
        return Path(source) if source else None
    count = data.synthetic_count if split == "train" else data.synthetic_eval_count
    seed = data.seed if split == "train" else data.seed + 1
    path = out_dir / "data" / f"synthetic-{split}"
    try:
        read_manifest(path)
    except (OSError, ValueError):
        log.info("writing %d synthetic %s records to %s", count, split, path)
        write_synth(path, count, data.image_size, seed, overwrite=True)
    return path


def run_dir(storage: Storage, resume: bool) -> Path:
    """The driver's folder for its logs, samples and generated data: the location itself on a path;
    on a URI a local mirror that the trainer uploads (``LOG_NAMES``) and a resume downloads first."""
    if storage.is_local:
        path = Path(storage.path())
    else:
        path = storage.staging_dir("driver")
        if resume:
            storage.download("", path, keep=lambda relative: relative.split("/")[0] in LOG_NAMES)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_job(config: Config, output_dir: str | Path) -> Job:
    """Start every role of the run whose checkpoints and export go under ``output_dir`` (a path,
    made absolute here, or a pyarrow.fs URI); the learner proves it reaches it before training.

    From here on the console shows segr1's lines and the roles' output goes to ``<run>/logs``
    (``Console``; on a URI, in the driver's local copy, uploaded with its other logs)."""
    started = time.monotonic()
    storage = Storage(output_dir)
    config = replace(config, model=resolve_model(config.model), trainer=replace(config.trainer, output_dir=storage.location))
    out_dir = run_dir(storage, config.trainer.resume)
    write_yaml(config_dict(config), out_dir / "config.yaml")  # what this run really used
    console = Console(out_dir / "logs", verbose=config.monitor.verbose)
    try:
        info = connect(**asdict(config.ray))
        if console.follow_workers() and not config.monitor.verbose:
            log.info("the roles' output (vLLM, DeepSpeed, SAM2, Ray) goes to %s; --verbose prints it here too",
                     console.logs_dir)
        config, source, eval_prompts = _prompts(config, out_dir)
        # Before the roles start: a tracker that refuses its settings stops the job in seconds.
        monitor = Monitor(out_dir, config.trainer.steps, settings=config.monitor, config=config_dict(config))
    except BaseException:
        console.close()
        raise
    try:
        trainer, roles = _start_roles(config, storage, info.num_gpus > 0, source, eval_prompts, monitor, started)
    except BaseException:
        monitor.close(failed=True)
        console.close()
        raise
    rollout, reward, learner, placements = roles
    return Job(trainer, rollout, reward, learner, monitor, placements, info.started_locally, console)


def _prompts(config: Config, out_dir: Path) -> tuple[Config, PromptSource, list[IssuedPrompt]]:
    """The training prompt source and the held-out prompts; ``config`` with the run's real length
    (``trainer.epochs`` may end it before ``trainer.steps``)."""
    # The engines' and the learner's bounds: the prompts' answer frame is computed with them.
    processor = load_processor(config.model.path, config.model.min_pixels, config.model.max_pixels)
    train_dir = dataset_dir(config, out_dir, "train")
    assert train_dir is not None
    reader = ShardReader(train_dir, shuffle=config.data.shuffle, seed=config.data.seed)
    steps = config.trainer.steps_for(len(reader))
    if steps < config.trainer.steps:
        log.info("training for %d steps: %s epochs of %d records", steps, config.trainer.epochs, len(reader))
        config = replace(config, trainer=replace(config.trainer, steps=steps))
    source = PromptSource(reader, processor, config.data.task, put=ray.put)
    eval_dir = dataset_dir(config, out_dir, "eval")
    eval_prompts = []
    if eval_dir is not None and config.trainer.eval_every > 0:
        eval_reader = ShardReader(eval_dir, shuffle=False, epochs=1)
        eval_prompts = PromptSource(eval_reader, processor, config.data.task, put=ray.put, prefix="eval").next(
            len(eval_reader)
        )
    return config, source, eval_prompts


def _start_roles(
    config: Config, storage: Storage, use_gpus: bool, source: PromptSource, eval_prompts: list[IssuedPrompt],
    monitor: Monitor, started: float,
) -> tuple[Trainer, tuple[Any, Any, Any, list[Any]]]:
    """The learner, rollout and reward roles in their placement groups, and the trainer over them;
    returns the trainer and (rollout, reward, learner, placements)."""
    placements = place_roles(role_requests(config, use_gpus))
    run = LearnerRun(config.model, config.grpo, seed=config.trainer.seed,
                     decay_steps=config.trainer.steps * config.learner.iterations_per_batch,  # the run's optimizer steps
                     temperature=config.rollout.temperature)
    # The ranks set up (DeepSpeed, the model) while the engines and SAM2 load: the roles start side by side.
    learner = LearnerGroup(config.learner, run, placement=placements["learner"], use_gpu=use_gpus, wait=False)
    try:  # before the engines start: a location the learner cannot see fails in seconds
        learner.check_storage(storage.location)
    except StorageError:
        learner.shutdown()
        for placement in placements.values():
            placement.remove()
        raise
    rollout = RolloutPool(config.model, config.rollout, seed=config.trainer.seed, placement=placements.get("rollout"),
                          use_gpu=use_gpus)
    reward = make_reward_pool(config.sam2, config.reward, placement_group=placements["reward"].placement_group)
    learner.ready()
    weights = WeightSync(learner, rollout)
    pipeline = Pipeline(rollout.pool, reward.pool, config.rollout.sampling(), prompts_per_call=None)  # over the live engines
    trainer = Trainer(config, pipeline, learner, weights, source, eval_prompts, monitor, storage.location,
                      fetch=ray.get, started=started)
    return trainer, (rollout, reward, learner, list(placements.values()))
