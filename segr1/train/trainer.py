"""The GRPO loop: generate and score groups, compute advantages, train, push weights, repeat.

Sync mode does the four stages one after the other. Async mode (one-step off-policy) submits the
next step's prompts before the learner trains, so rollouts run on the previous weights while the
learner works; groups older than ``trainer.max_staleness`` weight versions are dropped and counted,
and the loss corrects for the rest with the behaviour log-probs the rollouts returned.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.pipeline import IssuedPrompt, Pipeline, ScoredPrompt
from segr1.config import Config
from segr1.core.grpo import group_advantages, zero_variance_groups
from segr1.core.parser import parse_completion
from segr1.core.schema import train_samples
from segr1.data.records import decode_mask
from segr1.runtime.storage import Storage, shown
from segr1.train.monitor import Monitor, SampleView
from segr1.train.prompt_source import PromptSource
from segr1.train.summary import draw_reward_curve, read_metrics, run_summary

log = logging.getLogger("segr1")

# The driver's files of a run; on a URI output_dir they are uploaded beside the checkpoints.
CURVE = "reward_curve.png"
LOG_NAMES = ("config.yaml", "metrics.jsonl", "tensorboard", "samples", "logs", CURVE)


@dataclass
class Batch:
    """One step's kept groups and what was thrown away on the way."""

    groups: list[ScoredPrompt]
    dropped_stale: int = 0
    dropped_zero_variance: int = 0
    refilled: int = 0  # prompts sent after the step's own, to replace groups dropped (or lost)


class Trainer:
    def __init__(
        self,
        config: Config,
        pipeline: Pipeline,
        learner: Any,  # LearnerGroup
        weights: Any,  # WeightSync: pushes the learner's weights to every rollout actor
        source: PromptSource,
        eval_prompts: list[IssuedPrompt],
        monitor: Monitor,
        output_dir: str | Path,  # the run's location: checkpoints/ and export/ go under it
        fetch: Any,  # ray.get in a job: reads an image or mask ref for sample pictures
        started: float | None = None,  # time.monotonic() when the job began (None: now)
    ) -> None:
        self.cfg = config
        self.pipeline = pipeline
        self.learner = learner
        self.weights = weights
        self.source = source
        self.eval_prompts = eval_prompts
        self.monitor = monitor
        self.storage = Storage(output_dir)
        self.checkpoints = self.storage.child("checkpoints").location
        self.fetch = fetch
        self.step = 0
        self._ready: list[ScoredPrompt] = []
        self._stop = False
        self._started = time.monotonic() if started is None else started
        self._resumed_from: int | None = None
        self._last_checkpoint: str | None = None
        self._accounted: dict[str, int] = {}  # the pools' counts at the last step's end

    @property
    def version(self) -> int:
        """The weight version the engines hold (kept by the learner, read through the weight sync)."""
        return self.weights.version

    # ---- the loop -------------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        self._install_stop_handlers()
        trainer = self.cfg.trainer
        last: dict[str, float] = {}
        self._accounted = self.pipeline.accounting()
        self.monitor.start(self.step)
        if trainer.mode == "async":
            self._submit(self.step)
        while self.step < trainer.steps and not self._stop:
            last = self._train_one_step()
            self.step += 1
            if self._due(trainer.checkpoint_every):
                self.save_checkpoint()
            if self.eval_prompts and self._due(trainer.eval_every):
                self.monitor.log_step(self.step, self.evaluate(), advance=False)
        if self._stop:
            log.info("stop requested at step %d", self.step)
        if not self._due(trainer.checkpoint_every):  # else this step's checkpoint is already written
            self.save_checkpoint()
        self.export()
        self._finish()
        return last

    def _finish(self) -> None:
        """The reward curve, the last logs uploaded (the last step's records may follow its
        checkpoint), and the summary on the console."""
        self.monitor.flush()
        records = read_metrics(self.monitor.out_dir / "metrics.jsonl")
        draw_reward_curve(records, self.monitor.out_dir / CURVE)
        self._upload_logs()
        self.monitor.close_bar()
        log.info("%s", run_summary(records, self.step, self.cfg.trainer.steps, time.monotonic() - self._started,
                                   self._places(), self._resumed_from, engines=self.pipeline.rollout.stats()))

    def _places(self) -> dict[str, str]:
        """Where the run's outputs are: the driver's files (on a URI, uploaded beside the
        checkpoints) and the latest checkpoint and the export."""
        local = self.monitor.out_dir

        def where(name: str) -> str:
            return str(local / name) if self.storage.is_local else shown(self.storage.child(name).location)

        places = {"metrics": where("metrics.jsonl")}
        if (local / "tensorboard").is_dir():
            places["tensorboard"] = f"{where('tensorboard')}  (tensorboard --logdir {where('tensorboard')})"
        if (local / "samples").is_dir():
            places["samples"] = where("samples")
        if (local / CURVE).is_file():
            places["reward curve"] = where(CURVE)
        if (local / "logs").is_dir():
            places["logs"] = where("logs")
        places["checkpoint"] = shown(self._last_checkpoint or self.checkpoints)
        places["export"] = shown(self.storage.child("export").location)
        if not self.storage.is_local:
            places["local copy"] = str(local)
        return places

    def _train_one_step(self) -> dict[str, float]:
        trainer = self.cfg.trainer
        started, cpu_started = time.monotonic(), time.process_time()
        if trainer.mode == "sync":
            self._submit(self.step)
        batch = self._collect_batch()
        rollout_done = time.monotonic()
        if trainer.mode == "async" and self.step + 1 < trainer.steps:
            self._submit(self.step + 1)  # generated on the current weights while the learner trains
        samples = self._train_samples(batch)
        batch_metrics = self._batch_metrics(batch)  # before the push: staleness is against these weights
        metrics = dict(self._while_pumping(self.learner.train_step, samples))
        trained = time.monotonic()
        self._while_pumping(self.weights.push)
        synced = time.monotonic()
        metrics.update(batch_metrics)
        metrics.update(
            rollout_s=rollout_done - started,
            train_s=trained - rollout_done,
            sync_s=synced - trained,
            step_s=synced - started,
            driver_cpu_s=time.process_time() - cpu_started,  # the driver's own work, its Ray threads included
            samples_per_s=len(samples) / max(synced - started, 1e-9),
            weight_version=self.version,
            rollout_engines=len(self.pipeline.rollout.live),
            **self._faults_since_last_step(),
        )
        self.monitor.log_step(self.step + 1, metrics)
        if self._due(trainer.sample_every, offset=1):
            self._save_samples(batch)
        return metrics

    # ---- rollouts and scoring -----------------------------------------------------------------

    def _submit(self, step: int) -> None:
        trainer = self.cfg.trainer
        want_masks = trainer.samples_to_save if self._due(trainer.sample_every, step=step + 1) else 0
        self.pipeline.submit(self.source.next(trainer.prompts_per_step), self._sampling(step), want_masks)

    def _sampling(self, step: int) -> Any:
        return replace(self.pipeline.sampling, seed=self.cfg.trainer.seed * 1_000_003 + step)

    def _collect_batch(self) -> Batch:
        """The step's groups, dropping stale and (optionally) zero-variance ones and refilling."""
        want = self.cfg.trainer.prompts_per_step
        batch = Batch(groups=[])
        while len(batch.groups) < want:
            if not self.pipeline.rollout.live:  # elastic, every engine gone: wait for a new one, bring it up to date
                log.warning("step %d: no rollout engine left; waiting for one to load", self.step + 1)
                self.weights.push(new=False)
            if not self._ready and not self.pipeline.pending:
                if batch.refilled >= 4 * want:
                    raise RuntimeError(
                        f"step {self.step}: only {len(batch.groups)} usable groups after {batch.refilled} "
                        f"refills ({batch.dropped_stale} stale, {batch.dropped_zero_variance} zero-variance)"
                    )
                missing = want - len(batch.groups)
                self.pipeline.submit(self.source.next(missing), self._sampling(self.step))
                batch.refilled += missing
            self._ready.extend(self.pipeline.pump(timeout=0.5))
            while self._ready and len(batch.groups) < want:
                self._keep_or_drop(self._ready.pop(0), batch)
        return batch

    def _keep_or_drop(self, scored: ScoredPrompt, batch: Batch) -> None:
        staleness = self.version - scored.group.rollout.weight_version
        if staleness > self.cfg.trainer.max_staleness:
            batch.dropped_stale += 1
            return
        rewards = torch.tensor([scored.group.rewards])
        if self.cfg.grpo.filter_zero_variance and bool(zero_variance_groups(rewards)[0]):
            batch.dropped_zero_variance += 1
            return
        batch.groups.append(scored)

    def _train_samples(self, batch: Batch) -> list:
        rewards = torch.tensor([g.group.rewards for g in batch.groups], dtype=torch.float64)
        if self.cfg.grpo.shuffle_rewards and len(rewards) > 1:  # a cyclic shift: no group keeps its own
            rewards = rewards.roll(1 + self.step % (len(rewards) - 1), dims=0)
        advantages = group_advantages(rewards, self.cfg.grpo.std_normalize, self.cfg.grpo.epsilon)
        samples = []
        for scored, adv in zip(batch.groups, advantages.tolist()):
            samples.extend(train_samples(scored.group, adv))
        return samples

    def _while_pumping(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)`` (the learner's step, the weight push) in a helper thread while this one
        keeps scoring the next step's rollouts as they finish (async mode).

        Once nothing is in flight (always so in sync mode) it blocks on the call: the pools'
        ``poll`` returns at once when they hold no work, so pumping on would spin a core."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(call, *args)
            while not future.done() and self.pipeline.pending:
                self._ready.extend(self.pipeline.pump(timeout=0.05))
            return future.result()

    def _faults_since_last_step(self) -> dict[str, int]:
        """Actor restarts, calls past their deadline and groups redone in the pools since the last step."""
        now = self.pipeline.accounting()
        since = {key: now[key] - self._accounted[key] for key in now}
        self._accounted = now
        return since

    def _batch_metrics(self, batch: Batch) -> dict[str, float]:
        scores = [s for g in batch.groups for s in g.group.scores]
        parts: dict[str, list[float]] = {}
        for score in scores:
            for name, value in score.parts.items():
                parts.setdefault(name, []).append(value)
        rewards = np.array([[s.reward for s in g.group.scores] for g in batch.groups])
        versions = [g.group.rollout.weight_version for g in batch.groups]
        return {
            "reward": float(rewards.mean()),
            "reward_std_in_group": float(rewards.std(axis=1).mean()),
            **{name: float(np.mean(values)) for name, values in parts.items()},
            "has_prompt": float(np.mean([s.num_boxes + s.num_points > 0 for s in scores])),
            # the mean length; the learner's "completion_tokens" is the batch's sum, not to be overwritten
            "completion_length": float(np.mean([len(c.token_ids) for g in batch.groups for c in g.group.rollout.completions])),
            "staleness": float(np.mean([self.version - v for v in versions])),
            "dropped_stale": batch.dropped_stale,
            "dropped_zero_variance": batch.dropped_zero_variance,
            "groups_refilled": batch.refilled,
            "zero_variance_groups": float(zero_variance_groups(torch.tensor(rewards)).sum()),
        }

    # ---- evaluation, samples, checkpoints -----------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Mean reward and IoU of greedy answers on the held-out prompts.

        Eval groups share the pools with training rollouts that may be in flight (async mode), so
        they are told apart by group id and training groups that finish meanwhile are kept.
        """
        if not self.eval_prompts:
            raise ValueError(
                "no held-out prompts to evaluate: set data.eval (or use synthetic data) and trainer.eval_every > 0"
            )
        eval_ids = {p.item.group_id for p in self.eval_prompts}
        self.pipeline.submit(self.eval_prompts, replace(self.pipeline.sampling, n=1, temperature=0.0))
        scores = []
        while len(scores) < len(eval_ids):
            for scored in self.pipeline.pump(timeout=0.5):
                if scored.group.rollout.group_id in eval_ids:
                    scores.append(scored.group.scores[0])
                else:
                    self._ready.append(scored)
        return {
            "eval_reward": float(np.mean([s.reward for s in scores])),
            "eval_iou": float(np.mean([s.parts.get("iou", 0.0) for s in scores])),
            "eval_has_prompt": float(np.mean([s.num_boxes + s.num_points > 0 for s in scores])),
        }

    def _save_samples(self, batch: Batch) -> None:
        views = []
        for scored in batch.groups:
            best = max(range(len(scored.group.scores)), key=lambda i: scored.group.scores[i].reward)
            score = scored.group.scores[best]
            if score.mask_png is None:
                continue
            rollout = scored.group.rollout
            text = rollout.completions[best].text
            parsed = parse_completion(text, rollout.item.policy_size)
            views.append(SampleView(
                group_id=rollout.group_id, image=self.fetch(rollout.item.image), gt_mask=self.fetch(scored.mask),
                pred_mask=decode_mask(score.mask_png), boxes=parsed.boxes, points=parsed.points,
                labels=parsed.labels, policy_size=rollout.item.policy_size, text=text, reward=score.reward,
            ))
        if views:
            self.monitor.save_samples(self.step + 1, views)

    def save_checkpoint(self) -> str:
        state = {"step": self.step, "data": self.source.state_dict()}  # the learner adds its weight version
        path = self.learner.save_checkpoint(self.checkpoints, state)
        self._last_checkpoint = str(path)
        self._upload_logs()
        log.info("checkpoint at step %d: %s", self.step, path)
        return path

    def _upload_logs(self) -> None:
        """On a URI the driver writes its logs locally (``monitor.out_dir``); copy them beside the
        checkpoints, so the run's location holds everything a resume elsewhere needs."""
        if self.storage.is_local:
            return
        self.monitor.flush()
        for name in LOG_NAMES:
            local = self.monitor.out_dir / name
            if local.is_dir():
                self.storage.upload(local, name)
            elif local.is_file():
                self.storage.write_bytes(name, local.read_bytes())

    def export(self) -> str:
        """The policy as a Hugging Face directory under ``<output_dir>/export``: the next stage's
        ``model.path`` and what ``segr1 eval`` and ``vllm serve`` load."""
        path = self.learner.export_hf(self.storage.child("export").location)
        log.info("exported the policy at step %d: %s", self.step, shown(path))
        return path

    def resume(self) -> bool:
        """Restore step, data position, weight version and learner state from the latest checkpoint.

        False when there is none yet, so a job can always be submitted with ``--resume``. Either
        way the logs are cut back to the step the run continues from: the steps a stopped run
        logged after its checkpoint are trained and logged again, and must not appear twice."""
        state = self.learner.load_checkpoint(self.checkpoints)
        if state is None:
            log.info("no checkpoint under %s yet: starting from step 0", shown(self.checkpoints))
            self.monitor.resume_at(0)
            return False
        self.step = int(state["step"])
        self.source.load_state_dict(state["data"])
        self.weights.push(new=False)  # the restored version, to the fresh engines
        self.monitor.resume_at(self.step)
        self._resumed_from = self.step
        log.info("resumed at step %d, weight version %d", self.step, self.version)
        return True

    # ---- helpers ------------------------------------------------------------------------------

    def _due(self, every: int, step: int | None = None, offset: int = 0) -> bool:
        step = self.step + offset if step is None else step
        return every > 0 and step > 0 and step % every == 0

    def request_stop(self) -> None:
        """Finish the current step, write a checkpoint and return from ``fit`` (thread-safe)."""
        self._stop = True

    def _install_stop_handlers(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            log.warning("signal %d: finishing this step, then checkpointing", signum)
            self.request_stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
