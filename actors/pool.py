"""A pool of Ray actors that hands each task to the least-loaded live actor and survives deaths.

Rollout and reward pools both sit on this. A task is a method name plus arguments; the pool keeps at
most ``max_in_flight_per_actor`` tasks on each actor and queues the rest. When an actor dies (the
task's ref raises ``RayActorError``), the task goes back to the queue and runs on another actor (or on
the same one once Ray has restarted it), up to ``max_attempts`` times. Application errors are raised to
the caller, never swallowed: a bug in scoring must stop the job, not silently drop a group.

A restartable actor that dies answers ``ActorUnavailableError`` until Ray has restarted it (which
takes as long as loading its model), so retries back off exponentially: with the default
``max_attempts`` a task keeps trying for about two and a half minutes before the error is raised.

A pool made with ``drop_dead`` holds actors that are never restarted (elastic rollout engines,
which go with their nodes): an actor that dies is retired for good and its tasks go to the others
at once; ``add`` brings in new ones.

A task has a deadline when the pool has one: ``deadline_s`` plus ``deadline_per_group_s`` for each
group of its ``work``. An actor still on a task past it is killed (Ray restarts it) and the task
is redone like one whose actor died. ``accounting`` counts, for the run's metrics, the actors that
went down, the calls past their deadline and the groups that had to be sent again.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError

from segr1.runtime.deadlines import call_deadline

log = logging.getLogger("segr1")

# A retried task waits 1, 2, 4 ... seconds (at most this) so a restarting actor has time to come back.
MAX_BACKOFF_S = 30.0


def _locked(method):
    """Run ``method`` holding the pool's lock: the trainer's thread polls the pool while a weight
    push in another thread drops and adds engines (an elastic pool)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


@dataclass
class PoolTask:
    """One submitted call; ``result`` is set once it has finished."""

    id: int
    method: str
    args: tuple
    kwargs: dict
    work: int = 1  # groups in the call: scales its deadline, counted when redone
    attempts: int = 0
    actor_index: int | None = None
    result: Any = None
    done: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float = 0.0
    not_before: float = 0.0
    redone: bool = False
    killed: bool = False  # its actor was killed past a deadline; the task comes back as failed


@dataclass
class ActorStats:
    completed: int = 0
    failures: int = 0
    busy_s: float = 0.0
    restarts: int = 0  # times the actor was seen to go down (a death, or killed past a deadline)
    past_deadline: int = 0
    down: bool = False  # since its last death, no call has come back
    groups: int = 0  # the work of the calls it completed
    retired: bool = False  # dead for good (a drop_dead pool): it gets no more work


class ActorPool:
    """Least-outstanding-work dispatch over a fixed list of (restartable) actors."""

    def __init__(
        self,
        actors: list[Any],
        names: list[str],
        max_in_flight_per_actor: int = 2,
        max_attempts: int = 10,
        deadline_s: float | None = None,
        deadline_per_group_s: float = 0.0,
        drop_dead: bool = False,
    ) -> None:
        if not actors:
            raise ValueError("an actor pool needs at least one actor")
        if len(actors) != len(names):
            raise ValueError(f"{len(actors)} actors but {len(names)} names")
        if max_in_flight_per_actor < 1:
            raise ValueError(f"max_in_flight_per_actor must be >= 1, got {max_in_flight_per_actor}")
        self.actors = list(actors)
        self.names = list(names)
        self.max_in_flight = max_in_flight_per_actor
        self.max_attempts = max_attempts
        self.deadline_s = deadline_s
        self.deadline_per_group_s = deadline_per_group_s
        self.drop_dead = drop_dead
        self.groups_redone = 0
        self._ids = itertools.count()
        self._queue: deque[PoolTask] = deque()
        self._running: dict[ray.ObjectRef, PoolTask] = {}
        self._load = [0] * len(actors)
        self._stats = [ActorStats() for _ in actors]
        self._avoid: dict[int, int] = {}  # task id -> actor index that just failed it
        self._lock = threading.RLock()

    @property
    def pending(self) -> int:
        """Tasks queued or running."""
        return len(self._queue) + len(self._running)

    @property
    @_locked
    def live(self) -> list[str]:
        """The names of the actors that still get work (all of them, unless some were retired)."""
        return [name for name, s in zip(self.names, self._stats) if not s.retired]

    @_locked
    def add(self, actor: Any, name: str) -> None:
        """A new actor, given work from now on."""
        self.actors.append(actor)
        self.names.append(name)
        self._load.append(0)
        self._stats.append(ActorStats())
        self._dispatch()

    @_locked
    def retire(self, name: str) -> None:
        """Give ``name`` no more work (it is dead); what it was running comes back as failed."""
        self._stats[self.names.index(name)].retired = True

    @_locked
    def submit(self, method: str, *args: Any, work: int = 1, **kwargs: Any) -> PoolTask:
        """Queue ``actor.method(*args, **kwargs)``; ``work``: the groups it holds."""
        task = PoolTask(next(self._ids), method, args, kwargs, work)
        self._queue.append(task)
        self._dispatch()
        return task

    @_locked
    def poll(self, timeout: float | None = 0.0) -> list[PoolTask]:
        """Finished tasks (in completion order); waits up to ``timeout`` for at least one."""
        if not self._running:
            if self._queue:  # only tasks backing off: let time pass, then retry
                time.sleep(min(timeout or 0.0, 1.0))
                self._dispatch()
            return []
        ready, _ = ray.wait(list(self._running), num_returns=1, timeout=timeout)
        if ready:  # collect everything else that is already done too
            ready, _ = ray.wait(list(self._running), num_returns=len(self._running), timeout=0)
        finished = [task for ref in ready if (task := self._finish(ref)) is not None]
        self._kill_late()
        self._dispatch()
        return finished

    def wait_all(self, timeout_per_poll: float = 1.0) -> list[PoolTask]:
        """Block until every submitted task has finished; returns them in completion order."""
        finished: list[PoolTask] = []
        while self.pending:
            finished.extend(self.poll(timeout_per_poll))
        return finished

    def map(self, method: str, items: list[Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``method(item, *args)`` for every item, results in input order."""
        tasks = [self.submit(method, item, *args, **kwargs) for item in items]
        self.wait_all()
        return [t.result for t in tasks]

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """The same call on every actor at once (no retry): weight sync, shutdown, health."""
        return ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def stats(self) -> dict[str, dict[str, float]]:
        """Per-actor completed tasks, failures, busy seconds and tasks per busy second."""
        return {
            name: {
                "completed": s.completed,
                "failures": s.failures,
                "busy_s": round(s.busy_s, 3),
                "tasks_per_s": s.completed / s.busy_s if s.busy_s > 0 else 0.0,
                "in_flight": self._load[i],
                "restarts": s.restarts,
                "past_deadline": s.past_deadline,
                "groups": s.groups,
                "retired": s.retired,
            }
            for i, (name, s) in enumerate(zip(self.names, self._stats))
        }

    def accounting(self) -> dict[str, int]:
        """Since the pool started: actors that went down, calls past their deadline, groups sent again."""
        return {
            "actor_restarts": sum(s.restarts for s in self._stats),
            "calls_past_deadline": sum(s.past_deadline for s in self._stats),
            "groups_redone": self.groups_redone,
        }

    def _kill_late(self) -> None:
        """Kill every actor still on a task past its deadline; Ray restarts it, the tasks come back
        as failed and are redone."""
        if self.deadline_s is None:
            return
        now = time.monotonic()
        for task in list(self._running.values()):
            index = task.actor_index
            assert index is not None
            limit = call_deadline(self.deadline_s, self.deadline_per_group_s, task.work)
            if task.killed or now - task.started_at <= limit:
                continue
            log.warning("%s: %s of %d group(s) still running after %.0f s, past its deadline: restarting the actor",
                        self.names[index], task.method, task.work, now - task.started_at)
            stats = self._stats[index]
            stats.past_deadline += 1
            stats.restarts += 1
            stats.down = True
            for other in self._running.values():  # they fail with it; the restarted actor must not be killed
                if other.actor_index == index:
                    other.killed = True
            ray.kill(self.actors[index], no_restart=False)

    def _dispatch(self) -> None:
        now = time.monotonic()
        while self._queue:
            task = self._queue[0]
            if task.not_before > now:
                return
            index = self._least_loaded(avoid=self._avoid.get(task.id))
            if index is None:
                return
            self._queue.popleft()
            task.actor_index = index
            task.attempts += 1
            task.started_at = time.monotonic()
            ref = getattr(self.actors[index], task.method).remote(*task.args, **task.kwargs)
            self._running[ref] = task
            self._load[index] += 1

    def _least_loaded(self, avoid: int | None) -> int | None:
        free = [i for i, load in enumerate(self._load) if load < self.max_in_flight and not self._stats[i].retired]
        if len(free) > 1 and avoid in free:
            free.remove(avoid)  # prefer another actor while the failed one restarts
        return min(free, key=lambda i: self._load[i]) if free else None

    def _finish(self, ref: ray.ObjectRef) -> PoolTask | None:
        task = self._running.pop(ref)
        index = task.actor_index
        assert index is not None
        self._load[index] -= 1
        stats = self._stats[index]
        try:
            task.result = ray.get(ref)
        except RayActorError:  # died, or still restarting after a death
            stats.failures += 1
            self._went_down(index)
            if self.drop_dead:  # it will not come back: the others take its work now
                if not stats.retired:
                    log.warning("%s is gone: its calls are redone on the other actors", self.names[index])
                stats.retired = True
                self._requeue(task, index, delay=0.0)
                return None
            if task.attempts >= self.max_attempts:
                raise
            self._requeue(task, index, delay=min(2.0 ** (task.attempts - 1), MAX_BACKOFF_S))
            return None
        stats.completed += 1
        stats.groups += task.work
        stats.down = False
        stats.busy_s += time.monotonic() - task.started_at
        task.done = True
        self._avoid.pop(task.id, None)
        return task

    def _went_down(self, index: int) -> None:
        stats = self._stats[index]
        if not stats.down:  # the other tasks it was running fail too: one restart, not one per task
            stats.restarts += 1
            stats.down = True

    def _requeue(self, task: PoolTask, failed_index: int, delay: float) -> None:
        if not task.redone:  # a task that fails again on a restarting actor is still one redo
            task.redone = True
            self.groups_redone += task.work
        self._avoid[task.id] = failed_index
        task.not_before = time.monotonic() + delay
        self._queue.appendleft(task)
