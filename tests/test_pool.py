"""ActorPool on a real local Ray cluster: load spreading, ordering, retry after an actor dies or hangs."""

from __future__ import annotations

import os
import time

import pytest
import ray

from actors.pool import ActorPool
from segr1.runtime.deadlines import HANG_DIR_ENV, hang_if_switched

pytestmark = pytest.mark.slow


@ray.remote(num_cpus=0.1, max_restarts=2)
class Squarer:
    def __init__(self, name: str) -> None:
        self.name = name

    def square(self, x: int, crash_marker: str | None = None) -> tuple[int, str]:
        hang_if_switched(self.name, "square")
        if crash_marker is not None and not os.path.exists(crash_marker):
            open(crash_marker, "w").close()
            os._exit(1)  # a hard crash, as a segfaulting SAM2 or an OOM kill would look
        return x * x, self.name

    def pid(self) -> int:
        return os.getpid()


def pid_once_restarted(actor, timeout_s: float = 60.0) -> int:
    """The actor's pid, once Ray has finished restarting it: a call made while it restarts fails
    with ActorUnavailableError (the pool may finish the redone work before the restart does)."""
    give_up = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(actor.pid.remote())
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > give_up:
                raise
            time.sleep(0.2)


def make_pool(n: int, **kwargs) -> ActorPool:
    names = [f"sq-{i}" for i in range(n)]
    return ActorPool([Squarer.remote(name) for name in names], names, **kwargs)


def test_map_returns_results_in_input_order_and_spreads_load(ray_cluster):
    pool = make_pool(2, max_in_flight_per_actor=2)
    results = pool.map("square", list(range(20)))
    assert [r[0] for r in results] == [x * x for x in range(20)]
    stats = pool.stats()
    assert sum(s["completed"] for s in stats.values()) == 20
    assert all(s["completed"] > 0 for s in stats.values()), stats


def test_in_flight_is_bounded(ray_cluster):
    pool = make_pool(2, max_in_flight_per_actor=1)
    for x in range(6):
        pool.submit("square", x)
    assert sum(s["in_flight"] for s in pool.stats().values()) == 2
    assert pool.pending == 6
    assert len(pool.wait_all()) == 6


def test_task_of_a_dead_actor_is_redone_elsewhere(ray_cluster, tmp_path):
    pool = make_pool(2, max_in_flight_per_actor=1)
    marker = str(tmp_path / "crashed")
    tasks = [pool.submit("square", x, crash_marker=marker if x == 3 else None) for x in range(8)]
    pool.wait_all()
    assert [t.result[0] for t in tasks] == [x * x for x in range(8)]
    assert tasks[3].attempts == 2
    assert sum(s["failures"] for s in pool.stats().values()) == 1  # no retry storm while it restarts


def test_deadline_a_hung_call_restarts_its_actor_and_is_redone_elsewhere(ray_cluster, tmp_path):
    """The tests' fault switch makes sq-0's next call hang; past its deadline (1 s + 0.5 s per group
    of work) the pool kills sq-0, Ray restarts it, and the call and the one queued behind it on sq-0
    are redone; every result comes back once."""
    names = ["sq-0", "sq-1"]
    env = {"env_vars": {HANG_DIR_ENV: str(tmp_path)}}
    actors = [Squarer.options(runtime_env=env).remote(name) for name in names]
    pool = ActorPool(actors, names, max_in_flight_per_actor=2, deadline_s=1.0, deadline_per_group_s=0.5)
    pid_before = ray.get(actors[0].pid.remote())
    (tmp_path / "sq-0.square").touch()
    started = time.monotonic()
    tasks = [pool.submit("square", x, work=2) for x in range(8)]
    pool.wait_all(timeout_per_poll=0.1)
    assert [t.result[0] for t in tasks] == [x * x for x in range(8)]
    assert time.monotonic() - started > 2.0  # the hung call was given its whole deadline of 1 + 2 x 0.5 s
    assert not (tmp_path / "sq-0.square").exists()  # the switch fired once; the restarted sq-0 answers
    assert pid_once_restarted(actors[0]) != pid_before
    accounting = pool.accounting()
    assert accounting["actor_restarts"] == 1 and accounting["calls_past_deadline"] == 1
    assert accounting["groups_redone"] in (2, 4)  # the hung call's 2 groups, and those queued behind it
    assert pool.stats()["sq-0"]["past_deadline"] == 1 and pool.stats()["sq-1"]["restarts"] == 0


def test_a_death_counts_one_restart_and_its_redone_groups(ray_cluster, tmp_path):
    pool = make_pool(1, max_in_flight_per_actor=2)
    marker = str(tmp_path / "crashed")
    tasks = [pool.submit("square", x, crash_marker=marker if x == 0 else None, work=3) for x in range(4)]
    pool.wait_all()
    assert [t.result[0] for t in tasks] == [x * x for x in range(4)]
    assert pool.accounting() == {"actor_restarts": 1, "calls_past_deadline": 0, "groups_redone": 6}


def test_application_errors_are_raised_not_swallowed(ray_cluster):
    pool = make_pool(1)
    pool.submit("square", "not a number")
    with pytest.raises(ray.exceptions.RayTaskError):
        pool.wait_all()


def test_pool_rejects_bad_construction():
    with pytest.raises(ValueError, match="at least one actor"):
        ActorPool([], [])
    with pytest.raises(ValueError, match="max_in_flight_per_actor"):
        ActorPool([object()], ["a"], max_in_flight_per_actor=0)


def mortal(name: str):
    """A Squarer that is never restarted, as an elastic rollout engine is not."""
    return Squarer.options(max_restarts=0).remote(name)


def test_an_elastic_pool_retires_a_dead_actor_and_gives_its_work_to_one_added_later(ray_cluster, tmp_path):
    """The only actor dies: its calls wait (nothing is lost) until an actor is added, which does them all."""
    pool = ActorPool([mortal("m-0")], ["m-0"], max_in_flight_per_actor=2, drop_dead=True)
    marker = str(tmp_path / "crashed")
    tasks = [pool.submit("square", x, crash_marker=marker if x == 0 else None, work=1) for x in range(4)]
    deadline = time.monotonic() + 60
    while pool.live:
        pool.poll(0.1)
        assert time.monotonic() < deadline, "the dead actor was never retired"
    assert pool.stats()["m-0"]["retired"] and pool.pending == 4 - sum(t.done for t in tasks)
    pool.add(mortal("m-1"), "m-1")
    pool.wait_all(timeout_per_poll=0.1)
    assert [t.result[0] for t in tasks] == [x * x for x in range(4)]
    assert {t.result[1] for t in tasks if t.redone} == {"m-1"}
    stats = pool.stats()
    assert pool.live == ["m-1"] and stats["m-0"]["groups"] + stats["m-1"]["groups"] == 4
    assert pool.accounting()["actor_restarts"] == 1
