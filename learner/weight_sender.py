"""The sending side of weight sync, run by the learner's rank 0.

A sync from the driver's point of view (the learner's Ray actor wraps these calls)::

    host, port = sender.address()                    # once, and again whenever the group changes
    # concurrently: sender.join(world_size)  and  actor.join_weight_group(host, port, offset, world_size, secret)
    plan = sender.plan(weight_meta, places)          # JSON-able; the same for every sync of a model
    # concurrently: sender.send(named_tensors, version, in_place)  and  actor.receive_weights(plan, version)

Rank 0 of the group is this sender; rollout engine workers take ranks 1..world_size-1 (an actor
with tensor-parallel size t takes t consecutive ranks from its offset). Each ``address()`` after
a ``join`` opens a fresh rendezvous store on a new port, so re-forming the group (an actor
restarted, actors were added) never meets a stale store or a half-torn-down group; the store of
the group it replaces is closed at that ``join``.

The store (``segr1.weightsync.rendezvous.RendezvousServer``) listens on ``host`` only, and every member,
this sender included, proves ``secret`` to it: the job's secret, which the learner group hands
to the sender and the driver hands to the rollout actors through Ray calls.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from segr1.runtime.ray_cluster import node_ip
from segr1.weightsync.rendezvous import RendezvousServer, new_secret
from segr1.weightsync.weight_sync import (
    DEFAULT_BUCKET_BYTES,
    BucketPlan,
    Place,
    Sent,
    WeightGroup,
    join_group,
    plan_buckets,
    send_buckets,
)


def weight_meta(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """``(name, shape, dtype)`` of unsharded tensors, the input of ``WeightSender.plan``."""
    return [(name, tuple(t.shape), t.dtype) for name, t in named_tensors]


class WeightSender:
    """Rank 0 of the learner-to-rollout weight group.

    ``secret``: the job's secret every member proves to the group's store; a fresh one when not
    given (a sender outside a job: tests, benchmarks), read back from ``self.secret``.
    """

    def __init__(
        self,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        backend: str | None = None,
        timeout_s: float = 1800.0,
        host: str | None = None,
        secret: str | None = None,
    ) -> None:
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.bucket_bytes = bucket_bytes
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.timeout_s = timeout_s
        self.host = host or node_ip()
        self.secret = new_secret() if secret is None else secret
        self._next: RendezvousServer | None = None  # opened by address(), used by the next join
        self._server: RendezvousServer | None = None  # the store of the current group
        self._group: WeightGroup | None = None
        self._plan: BucketPlan | None = None

    def address(self) -> tuple[str, int]:
        """The rendezvous the next ``join`` uses; opens a fresh one if the last was consumed."""
        if self._next is None:
            self._next = RendezvousServer(self.host, self.secret)
        return self.host, self._next.port

    def join(self, world_size: int) -> None:
        """Form the group of ``world_size`` ranks (this one is 0); blocks until all have joined."""
        if world_size < 2:
            raise ValueError(f"a weight group needs the sender and at least one receiver, got {world_size}")
        _, port = self.address()
        self._group = None
        if self._server is not None:
            self._server.close()
        self._server, self._next = self._next, None
        self._group = join_group(
            self.host, port, 0, world_size, self.backend, secret=self.secret, local_host=self.host,
            timeout_s=self.timeout_s,
        )

    def close(self) -> None:
        """Close the stores this sender serves (the group itself stays connected until dropped)."""
        for server in (self._next, self._server):
            if server is not None:
                server.close()
        self._next = self._server = None

    @property
    def world_size(self) -> int:
        return 0 if self._group is None else self._group.world_size

    def plan(
        self,
        named_tensors_meta: Iterable[tuple[str, Iterable[int], torch.dtype | str]],
        places: dict[str, Place] | None = None,
    ) -> BucketPlan:
        """Bucket plan for tensors streamed in this order (laid out as they lie in memory where
        ``places`` says); kept for the following ``send`` calls."""
        self._plan = plan_buckets(named_tensors_meta, self.bucket_bytes, places)
        return self._plan

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, in_place: bool = False) -> Sent:
        """Stream one sync (the tensors in plan order) to every receiver. ``in_place``: the tensors
        stay valid until this returns, so those lying in memory as planned are sent without a copy."""
        if self._group is None:
            raise RuntimeError("send before join: no weight group has been formed")
        if self._plan is None:
            raise RuntimeError("send before plan: call plan(weight_meta) first")
        return send_buckets(self._group, self._plan, named_tensors, version, in_place=in_place)
