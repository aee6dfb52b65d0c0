"""The GRPO driver loop (``Trainer`` over a real ``Pipeline``) against fakes, fast and deterministic.

The real loop runs end to end in tests/test_run.py, with vLLM, SAM2 and DeepSpeed behind Ray; there a
stale or zero-variance group is rare and timing decides what overlaps what, so those runs cannot say
whether the loop drops, counts, refills and overlaps as it should. Here every part the trainer talks
to is a fake named as one, scripted per group id, writing to one event log. Where a broken loop
would leave a fake waiting, the fake gives up after a few seconds and fails the test instead.
Checkpoints are only written at the end (``checkpoint_every 0``) to keep the logs short.

- ``FakeRolloutPool`` stands for the ``ActorPool`` of rollout actors (``submit("generate", items,
  sampling)``, ``poll``, ``pending``): one ``RolloutGroup`` per prompt, at the weight version the engines
  held when it was submitted unless the test says otherwise.
- ``FakeRewardPool`` stands for the ``ActorPool`` of reward (SAM2) actors (``submit("score_group", ...)``):
  the rewards of each group come from the test.
- ``FakeLearner`` stands for the ``LearnerGroup``: it records what it trains on and owns
  ``weight_version``, the one record of the engines' weights; ``FakeWeightSync`` stands for
  ``WeightSync`` and, like it, reads the version from the learner and pushes the next one.
- ``FakePromptSource`` stands for the ``PromptSource``: prompts ``g0``, ``g1``, ... in order.
"""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest

from actors.pipeline import IssuedPrompt, Pipeline
from actors.rollout import SamplingSettings
from segr1.config import load_config
from segr1.core.schema import Completion, PromptItem, RolloutGroup, SampleScore
from segr1.train.monitor import Monitor
from segr1.train.trainer import Trainer

GROUP_SIZE = 4
PER_STEP = 2  # trainer.prompts_per_step
SPREAD = [0.0, 0.25, 0.5, 1.0]  # a group the learner can learn from
FLAT = [0.5] * GROUP_SIZE  # a zero-variance group
WAIT_S = 3.0  # how long a fake waits for something a correct loop does at once


def index(gid: str) -> int:
    return int(gid[1:])


def step_of(gid: str) -> int:
    """The step a group is drawn for when nothing is refilled (g0 g1: step 0, g2 g3: step 1, ...)."""
    return index(gid) // PER_STEP


def step_groups(k: int) -> list[str]:
    return [f"g{PER_STEP * k + i}" for i in range(PER_STEP)]


class FakePromptSource:
    def __init__(self, events):
        self.events, self.issued = events, 0

    def next(self, count):
        if self.issued + count > 100:  # an unbounded refill fails here instead of running forever
            raise AssertionError(f"drew {self.issued + count} prompts")
        ids = [f"g{self.issued + i}" for i in range(count)]
        self.issued += count
        self.events.append(("draw", ids))
        items = [PromptItem(gid, gid, "prompt", image=None, policy_size=(28, 28)) for gid in ids]
        return [IssuedPrompt(item, mask=None) for item in items]

    def state_dict(self):
        return {"issued": self.issued}


class FakeLearner:
    """``wait_for(k)``: group ids that train_step k waits to see scored (the loop pumps meanwhile)."""

    def __init__(self, events, wait_for=lambda k: [], reward_pool=None):
        self.events, self.wait_for, self.reward_pool = events, wait_for, reward_pool
        self.weight_version, self.started, self.trained, self.busy_s = 0, 0, [], 0.0
        self.advantages = []  # per train_step: each group's samples' advantages

    def train_step(self, samples):
        ids = list(dict.fromkeys(s.group_id for s in samples))
        self.events.append(("train_start", ids))
        k, self.started = self.started, self.started + 1
        self.trained.append(ids)
        self.advantages.append({gid: [s.advantage for s in samples if s.group_id == gid] for gid in ids})
        time.sleep(self.busy_s)
        awaited = self.wait_for(k)
        if awaited and not self.reward_pool.wait_scored(awaited, WAIT_S):
            raise AssertionError(f"train_step {k}: {awaited} were not scored while it ran")
        self.events.append(("train_end", ids))
        return {"loss": 0.0}

    def save_checkpoint(self, root, state):
        self.events.append(("checkpoint", state["step"]))
        return f"{root}/step_{state['step']}"

    def export_hf(self, location):
        self.events.append(("export",))
        return location


class FakeWeightSync:
    def __init__(self, events, learner):
        self.events, self.learner = events, learner

    @property
    def version(self):
        return self.learner.weight_version

    def push(self, new=True):
        self.learner.weight_version += int(new)
        self.events.append(("push", self.version))
        return self.version


NO_FAULTS = {"actor_restarts": 0, "calls_past_deadline": 0, "groups_redone": 0}


class FakeRolloutPool:
    """``versions``: weight version a group comes back with; ``hold(gid)``: keep it in flight for now."""

    def __init__(self, events, weights, versions=None, hold=lambda gid: False):
        self.events, self.weights, self.versions, self.hold = events, weights, versions or {}, hold
        self.running, self.polls = [], 0

    def submit(self, method, items, sampling, work):
        assert method == "generate" and work == len(items)
        self.events.append(("submit", [item.group_id for item in items]))
        self.running.append(SimpleNamespace(args=(items, sampling), version=self.weights.version, result=None,
                                            deadline=time.monotonic() + WAIT_S))

    @property
    def pending(self):
        return len(self.running)

    def poll(self, timeout=0.0):
        self.polls += 1
        done = [t for t in self.running if not any(self.hold(item.group_id) for item in t.args[0])]
        if not done and any(t.deadline < time.monotonic() for t in self.running):
            raise AssertionError(f"rollouts held past {WAIT_S} s: what they wait for never happened")
        if not done:
            time.sleep(timeout if self.running else 0.0)  # as ray.wait waits on work in flight
        for task in done:
            self.running.remove(task)
            items, sampling = task.args
            task.result = [RolloutGroup(item, [1, 2, 3], self._completions(sampling.n),
                                        self.versions.get(item.group_id, task.version)) for item in items]
        return done

    @staticmethod
    def accounting():
        return NO_FAULTS

    live = ["fake-rollout"]  # one engine that never goes away

    @staticmethod
    def stats():
        return {"fake-rollout": {"groups": 0, "retired": False}}

    @staticmethod
    def _completions(n):
        return [Completion([7, 8], "<think></think>", [-0.5, -0.5], "stop") for _ in range(n)]


class FakeRewardPool:
    def __init__(self, events, rewards_of=lambda gid: SPREAD):
        self.events, self.rewards_of = events, rewards_of
        self.queued, self.scored = [], set()
        self.changed = threading.Condition()

    def submit(self, method, group, mask, with_mask):
        assert method == "score_group"
        self.queued.append(SimpleNamespace(args=(group, mask, with_mask), result=None))

    @property
    def pending(self):
        return len(self.queued)

    def poll(self, timeout=0.0):
        done, self.queued = self.queued, []
        for task in done:
            gid = task.args[0].group_id
            task.result = [SampleScore(r, {"iou": r}, num_boxes=1) for r in self.rewards_of(gid)]
            self.events.append(("scored", gid))
            with self.changed:
                self.scored.add(gid)
                self.changed.notify_all()
        return done

    @staticmethod
    def accounting():
        return NO_FAULTS

    def wait_scored(self, gids, timeout):
        with self.changed:
            return self.changed.wait_for(lambda: self.scored.issuperset(gids), timeout)


_monitors: list[Monitor] = []


@pytest.fixture(autouse=True)
def _close_monitors():
    yield
    while _monitors:
        _monitors.pop().close()


def make_trainer(tmp_path, overrides, rewards_of=lambda gid: SPREAD, versions=None, hold=lambda gid: False,
                 wait_for=lambda k: []):
    config = load_config("tiny", ["--rollout.group_size", str(GROUP_SIZE), "--trainer.prompts_per_step",
                                  str(PER_STEP), "--trainer.checkpoint_every", "0", *overrides])
    events = []
    reward = FakeRewardPool(events, rewards_of)
    learner = FakeLearner(events, wait_for, reward)
    weights = FakeWeightSync(events, learner)
    pipeline = Pipeline(FakeRolloutPool(events, weights, versions, hold), reward, SamplingSettings(n=GROUP_SIZE))
    monitor = Monitor(tmp_path / "logs", config.trainer.steps, ray_metrics=False)
    _monitors.append(monitor)
    trainer = Trainer(config, pipeline, learner, weights, FakePromptSource(events), [], monitor, tmp_path,
                      fetch=lambda ref: ref)
    return trainer, learner, events


def logged(trainer, key):
    lines = (trainer.monitor.out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines]


def draws(events):
    return [ids for name, *rest in events if name == "draw" for ids in rest]


# ---- the tests ------------------------------------------------------------------------------------


def test_a_stale_group_is_dropped_counted_and_refilled(tmp_path):
    """A rollout actor that restarted answers from version 0: its group must not be trained on."""
    trainer, learner, events = make_trainer(tmp_path, ["--trainer.mode", "async", "--trainer.steps", "3"],
                                            versions={"g5": 0})
    trainer.fit()
    # g4 is one version behind at step 3 (kept: max_staleness is 1), g5 two (dropped), g6 its refill
    assert trainer.cfg.trainer.max_staleness == 1
    assert learner.trained == [["g0", "g1"], ["g2", "g3"], ["g4", "g6"]]
    assert draws(events) == [["g0", "g1"], ["g2", "g3"], ["g4", "g5"], ["g6"]]
    assert logged(trainer, "dropped_stale") == [0, 0, 1]
    assert logged(trainer, "staleness") == [0.0, 1.0, 0.5]
    assert logged(trainer, "weight_version") == [1, 2, 3]


@pytest.mark.parametrize("filter_on", [True, False])
def test_a_zero_variance_group_is_dropped_and_refilled_when_filtering(tmp_path, filter_on):
    """A group with equal rewards carries no signal; with the filter on it is replaced, not trained on."""
    trainer, learner, events = make_trainer(
        tmp_path, ["--trainer.steps", "1", "--grpo.filter_zero_variance", str(filter_on).lower()],
        rewards_of=lambda gid: FLAT if gid == "g1" else SPREAD)
    trainer.fit()
    if filter_on:
        assert learner.trained == [["g0", "g2"]]
        assert draws(events) == [["g0", "g1"], ["g2"]]
        assert logged(trainer, "dropped_zero_variance") == [1]
        assert logged(trainer, "zero_variance_groups") == [0.0]
    else:
        assert learner.trained == [["g0", "g1"]]
        assert draws(events) == [["g0", "g1"]]
        assert logged(trainer, "dropped_zero_variance") == [0]
        assert logged(trainer, "zero_variance_groups") == [1.0]


def test_a_control_run_trains_each_group_on_another_groups_rewards_and_logs_the_true_ones(tmp_path):
    """``grpo.shuffle_rewards`` (the learning benchmark's control): the advantages must come from
    another group of the batch (else the control still carries the signal), the logged reward not."""
    ascending, descending = [0.0, 0.25, 0.5, 1.0], [1.0, 0.5, 0.25, 0.0]
    rewards_of = lambda gid: ascending if index(gid) % 2 == 0 else descending  # noqa: E731
    runs = {}
    for shuffled in (False, True):
        trainer, learner, _ = make_trainer(tmp_path / str(shuffled), [
            "--trainer.steps", "2", "--grpo.shuffle_rewards", str(shuffled).lower()], rewards_of=rewards_of)
        trainer.fit()
        runs[shuffled] = learner.advantages, logged(trainer, "reward")
    (plain, plain_reward), (shuffled, shuffled_reward) = runs[False], runs[True]
    assert plain_reward == shuffled_reward == [pytest.approx(0.4375)] * 2
    for step_plain, step_shuffled in zip(plain, shuffled):
        (a, b) = step_plain  # the batch's two groups, in order
        assert step_plain[a][0] < 0 < step_plain[a][-1]  # its own rewards rise along the group
        assert step_shuffled[a] == step_plain[b] and step_shuffled[b] == step_plain[a]


def test_the_refill_limit_stops_a_step_that_never_fills(tmp_path):
    """A policy collapsed to one answer per prompt must stop the run, not draw prompts forever."""
    trainer, learner, events = make_trainer(
        tmp_path, ["--trainer.steps", "3", "--grpo.filter_zero_variance", "true"],
        rewards_of=lambda gid: SPREAD if step_of(gid) == 0 else FLAT)  # flat from the second step on
    with pytest.raises(RuntimeError, match=r"^step 1: only 0 usable groups after 8 refills "
                                           r"\(0 stale, 10 zero-variance\)$"):
        trainer.fit()
    assert learner.trained == [["g0", "g1"]]
    assert sum(len(ids) for ids in draws(events)[1:]) == 10  # the step's 2 prompts, then 4 x 2 refills


def submits(*ids):
    return [("submit", [gid]) for gid in ids]  # the pipeline's default: one group per call


ASYNC_LOG = [
    ("draw", ["g0", "g1"]), *submits("g0", "g1"), ("scored", "g0"), ("scored", "g1"),
    ("draw", ["g2", "g3"]), *submits("g2", "g3"),  # the next step's rollouts go out before this step trains
    ("train_start", ["g0", "g1"]), ("scored", "g2"), ("scored", "g3"), ("train_end", ["g0", "g1"]), ("push", 1),
    ("draw", ["g4", "g5"]), *submits("g4", "g5"),
    ("train_start", ["g2", "g3"]), ("scored", "g4"), ("scored", "g5"), ("train_end", ["g2", "g3"]), ("push", 2),
    ("train_start", ["g4", "g5"]), ("train_end", ["g4", "g5"]), ("push", 3),
    ("checkpoint", 3), ("export",),
]
SYNC_LOG = [
    ("draw", ["g0", "g1"]), *submits("g0", "g1"), ("scored", "g0"), ("scored", "g1"),
    ("train_start", ["g0", "g1"]), ("train_end", ["g0", "g1"]), ("push", 1),
    ("draw", ["g2", "g3"]), *submits("g2", "g3"), ("scored", "g2"), ("scored", "g3"),
    ("train_start", ["g2", "g3"]), ("train_end", ["g2", "g3"]), ("push", 2),
    ("draw", ["g4", "g5"]), *submits("g4", "g5"), ("scored", "g4"), ("scored", "g5"),
    ("train_start", ["g4", "g5"]), ("train_end", ["g4", "g5"]), ("push", 3),
    ("checkpoint", 3), ("export",),
]


@pytest.mark.parametrize(("mode", "expected"), [("async", ASYNC_LOG), ("sync", SYNC_LOG)])
def test_async_rollouts_of_the_next_step_overlap_training_and_sync_ones_do_not(tmp_path, mode, expected):
    """Async mode must generate and score step k+1 while the learner trains step k (else it is sync
    mode at async staleness); sync mode must generate only on the weights just pushed."""
    steps = 3
    trainer, learner, events = make_trainer(
        tmp_path, ["--trainer.mode", mode, "--trainer.steps", str(steps)],
        # step k+1's rollouts take until step k's training has begun ...
        hold=lambda gid: learner.started < step_of(gid),
        # ... and in async mode step k's training lasts until they are scored
        wait_for=lambda k: step_groups(k + 1) if mode == "async" and k + 1 < steps else [],
    )
    trainer.fit()
    assert events == expected
    assert logged(trainer, "staleness") == ([0.0, 1.0, 1.0] if mode == "async" else [0.0, 0.0, 0.0])


def test_the_driver_blocks_on_the_learner_when_nothing_is_in_flight(tmp_path):
    """A driver that keeps polling empty pools while the learner trains burns a core the learner needs."""
    trainer, learner, _ = make_trainer(tmp_path, ["--trainer.mode", "sync", "--trainer.steps", "1"])
    learner.busy_s = 0.3
    trainer.fit()
    assert learner.trained == [["g0", "g1"]]
    (driver_cpu,) = logged(trainer, "driver_cpu_s")  # a figure users see
    assert 0 < driver_cpu < learner.busy_s / 6  # measured: 0.012 s blocked, 0.11 s spinning
    assert trainer.pipeline.rollout.polls < 10  # the step's one collect; spinning made thousands


def test_with_every_rollout_engine_gone_a_step_first_brings_a_new_one_to_the_current_weights(tmp_path):
    """Elastic rollout, the last engine's node gone: the step must get a new engine through a push of
    the current version (not a new one) before it waits on rollouts that no engine would run."""
    trainer, learner, events = make_trainer(tmp_path, ["--trainer.steps", "2"])
    rollout, weights = trainer.pipeline.rollout, trainer.weights
    rollout.live = []
    push = weights.push

    def push_bringing_an_engine(new=True):
        if not new:
            rollout.live = ["fake-rollout-1"]  # loaded meanwhile: this push admits it
        return push(new)

    weights.push = push_bringing_an_engine
    trainer.fit()
    assert [event for event in events if event[0] == "push"] == [("push", 0), ("push", 1), ("push", 2)]
    assert learner.trained == [["g0", "g1"], ["g2", "g3"]]
    assert logged(trainer, "rollout_engines") == [1, 1]


def test_async_scoring_goes_on_while_the_weights_are_pushed(tmp_path):
    """The next step's rollouts that finish during a push (seconds for a 7B model) must go to the
    reward actors then, not wait for the push to end: here they finish only once the push began,
    and the push ends only once they are scored."""
    trainer, learner, events = make_trainer(tmp_path, ["--trainer.mode", "async", "--trainer.steps", "2"],
                                            hold=lambda gid: gid in ("g2", "g3") and not pushing.is_set())
    reward, weights, pushing = trainer.pipeline.reward, trainer.weights, threading.Event()
    push = weights.push

    def push_awaiting_scores(new=True):
        pushing.set()  # from now on the held rollouts finish; a blocked driver would never score them
        if learner.started == 1 and not reward.wait_scored(["g2", "g3"], WAIT_S):
            raise AssertionError("the next step's groups were not scored while the weights were pushed")
        return push(new)

    weights.push = push_awaiting_scores
    trainer.fit()
    assert learner.trained == [["g0", "g1"], ["g2", "g3"]]
    assert events.index(("scored", "g2")) < events.index(("push", 1))
