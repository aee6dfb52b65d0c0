"""Deadlines on the calls the driver makes into its actors, and the switch tests use to make one hang.

A call that never returns (a wedged CUDA kernel, an NCCL peer gone, a deadlock in a library) would
stall a job forever without a word. Every rollout and reward call has a deadline, scaled by the
groups in it (``call_deadline(base, per_group, groups)``); ``actors.pool.ActorPool`` kills an
actor past it, Ray restarts it and the call is redone. A weight push or a learner step past its
deadline cannot be redone elsewhere (every rank holds a part of the one model): ``get_within``
raises ``DeadlineExceeded`` naming the actors, the call and the setting (``Deadline``), and the
job stops with its last checkpoint as it was.

The fault switch is for tests only. With ``$SEGR1_TEST_HANG_DIR`` set (the roles' runtime env
carries it, ``with_fault_switch``), a call checks for a file named ``<actor>.<call>`` there (for
example ``rollout-0.generate``); if it finds it, it removes it and hangs. The file is the switch's
memory across a restart: the restarted actor finds no file and answers. Unset, nothing is checked.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("segr1")

HANG_DIR_ENV = "SEGR1_TEST_HANG_DIR"


class DeadlineExceeded(RuntimeError):
    """A call that cannot be redone elsewhere gave no answer in time; the job stops."""


def call_deadline(base_s: float, per_group_s: float, groups: int) -> float:
    """Seconds a call of ``groups`` groups may take: a base for the call plus a share per group."""
    return base_s + per_group_s * groups


@dataclass(frozen=True)
class Deadline:
    """How long a call may take, and the configuration key that says so (for the message)."""

    seconds: float
    setting: str


def get_within(named_refs: Sequence[tuple[str, Any]], deadline: Deadline | None, call: str) -> list[Any]:
    """``ray.get`` of the refs of ``(actor name, ref)`` pairs, or ``DeadlineExceeded`` naming the
    actors still running ``call`` once ``deadline`` has passed (``None``: no deadline)."""
    import ray

    refs = [ref for _, ref in named_refs]
    if deadline is not None:
        _, waiting = ray.wait(refs, num_returns=len(refs), timeout=deadline.seconds)
        if waiting:
            late = [name for name, ref in named_refs if ref in waiting]
            raise DeadlineExceeded(
                f"{call}: no answer from {', '.join(late)} within {deadline.seconds:.0f} s ({deadline.setting}); "
                "the job stops here, its last checkpoint as it was (continue with --resume)"
            )
    return ray.get(refs)


def with_fault_switch(runtime_env: dict[str, Any] | None) -> dict[str, Any] | None:
    """An actor's ``runtime_env`` plus the fault switch's variable when the driver has it set
    (Ray's workers do not inherit the driver's environment); unchanged otherwise."""
    value = os.environ.get(HANG_DIR_ENV)
    if not value:
        return runtime_env
    env = dict(runtime_env or {})
    env["env_vars"] = {**env.get("env_vars", {}), HANG_DIR_ENV: value}
    return env


def hang_if_switched(actor: str, call: str) -> None:
    """Hang forever when a test has switched on a hang of ``actor``'s ``call`` (see the module doc)."""
    folder = os.environ.get(HANG_DIR_ENV)
    if not folder:
        return
    try:
        (Path(folder) / f"{actor}.{call}").unlink()
    except FileNotFoundError:
        return
    log.warning("%s.%s: hanging, as the test fault switch %s says", actor, call, HANG_DIR_ENV)
    while True:
        time.sleep(3600)
