"""Bucket plans and the dedicated gloo weight group, with real collectives between threads.

Every rank runs in a thread of this process with its own ProcessGroupGloo over a real rendezvous
store, exactly as the learner and the rollout workers do across processes; no vLLM, no Ray.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from learner.weight_sender import WeightSender, weight_meta
from segr1.testing.layouts import zero2_like
from segr1.weightsync.weight_sync import (
    ALIGN_BYTES,
    BucketPlan,
    WeightSyncError,
    drain,
    flatten,
    join_group,
    plan_buckets,
    receive_buckets,
    tensor_places,
    unflatten,
)


def model_tensors(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Mixed dtypes and odd sizes, so alignment and dtype views are exercised."""
    g = torch.Generator().manual_seed(seed)
    tensors = [(f"layers.{i}.weight", torch.randn(3, 7 + i, generator=g)) for i in range(12)]
    tensors.append(("norm.weight", torch.randn(5, generator=g).to(torch.bfloat16)))
    tensors.append(("embed.weight", torch.randn(40, 33, generator=g)))  # bigger than a bucket
    tensors.append(("step", torch.tensor([7, -3], dtype=torch.int64)))
    tensors.append(("scale", torch.randn(3, generator=g).to(torch.float16)))
    return tensors


BUCKET_BYTES = 1024


def test_plan_keeps_order_bounds_buckets_and_aligns_offsets():
    tensors = model_tensors()
    plan = plan_buckets(weight_meta(tensors), BUCKET_BYTES)
    assert plan.names() == [n for n, _ in tensors]
    assert plan.num_tensors == len(tensors)
    for bucket in plan.buckets:
        assert all(slot.offset % ALIGN_BYTES == 0 for slot in bucket.slots)
        if len(bucket.slots) > 1:  # only a lone oversize tensor may exceed the bucket size
            assert bucket.slots[-1].offset + bucket.slots[-1].nbytes <= BUCKET_BYTES
    big = [b for b in plan.buckets if any(s.name == "embed.weight" for s in b.slots)]
    assert len(big) == 1 and len(big[0].slots) == 1 and big[0].slots[0].nbytes == 40 * 33 * 4
    assert plan.total_bytes >= sum(t.numel() * t.element_size() for _, t in tensors)


def test_plan_round_trips_through_json_and_digest_tracks_content():
    plan = plan_buckets(weight_meta(model_tensors()), BUCKET_BYTES)
    again = BucketPlan.from_json(plan.to_json())
    assert again == plan and again.digest() == plan.digest()
    other = plan_buckets(weight_meta(model_tensors()), BUCKET_BYTES * 2)
    assert other.digest() != plan.digest()


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="appears twice"):
        plan_buckets([("a", (2,), torch.float32), ("a", (2,), torch.float32)], BUCKET_BYTES)
    with pytest.raises(ValueError, match="bucket_bytes must be positive"):
        plan_buckets([("a", (2,), torch.float32)], 0)
    with pytest.raises(ValueError, match="empty"):
        plan_buckets([], BUCKET_BYTES)
    with pytest.raises(ValueError, match="cannot be sent"):
        plan_buckets([("c", (2,), torch.complex64)], BUCKET_BYTES)
    with pytest.raises(ValueError, match="malformed bucket plan"):
        BucketPlan.from_json({"buckets": [{"slots": []}]})


def test_flatten_then_unflatten_is_bit_exact_for_every_dtype():
    tensors = model_tensors()
    plan = plan_buckets(weight_meta(tensors), BUCKET_BYTES)
    it = iter(tensors)
    for bucket in plan.buckets:
        chunk = [next(it) for _ in bucket.slots]
        flat = flatten(bucket, [t for _, t in chunk])
        assert flat.dtype == torch.uint8 and flat.numel() == bucket.nbytes
        for (name, original), (got_name, got) in zip(chunk, unflatten(bucket, flat)):
            assert got_name == name and got.dtype == original.dtype
            assert torch.equal(got, original)


def run_ranks(fns: list[Callable[[], Any]], timeout: float = 60.0) -> list[Any]:
    """Run one callable per rank in threads; return results (or the exception each raised)."""
    results: list[Any] = [None] * len(fns)

    def wrap(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test to assert on
            results[i] = exc

    threads = [threading.Thread(target=wrap, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a rank is still blocked in a collective"
    return results


def form_group(sender: WeightSender, num_receivers: int, timeout_s: float = 30.0) -> list[Any]:
    host, port = sender.address()
    world = 1 + num_receivers
    fns = [lambda: sender.join(world)] + [
        (lambda r=r: join_group(host, port, r, world, "gloo", secret=sender.secret, timeout_s=timeout_s))
        for r in range(1, world)
    ]
    results = run_ranks(fns)
    assert not any(isinstance(r, BaseException) for r in results), results
    return results[1:]


def padding(plan: BucketPlan) -> int:
    return plan.total_bytes - sum(slot.nbytes for b in plan.buckets for slot in b.slots)


def receive_all(group, plan, version):
    return {name: t.clone() for name, t in receive_buckets(group, plan, version)}


def test_every_receiver_gets_identical_tensors_and_the_group_survives_many_syncs():
    sender = WeightSender(bucket_bytes=BUCKET_BYTES)
    receivers = form_group(sender, 2)
    for version in (1, 2):
        tensors = model_tensors(seed=version)
        plan = sender.plan(weight_meta(tensors))
        results = run_ranks(
            [lambda: sender.send(iter(tensors), version)]
            + [lambda g=g: receive_all(g, BucketPlan.from_json(plan.to_json()), version) for g in receivers]
        )
        assert results[0].bytes == plan.total_bytes and results[0].staged == plan.total_bytes - padding(plan)
        for received in results[1:]:
            assert list(received) == [n for n, _ in tensors]
            for name, original in tensors:
                assert torch.equal(received[name], original), name


def test_buffers_are_reused_from_one_sync_to_the_next():
    """Fresh CPU buffers cost a page fault per 4 KB; a steady-state sync allocates none."""
    sender = WeightSender(bucket_bytes=BUCKET_BYTES)
    (receiver,) = form_group(sender, 1)
    tensors = model_tensors()
    plan = sender.plan(weight_meta(tensors))
    assert len(plan.buckets) > 4  # more buckets than either side keeps buffers

    def sync(version: int) -> list[Any]:
        return run_ranks([lambda: sender.send(iter(tensors), version), lambda: receive_all(receiver, plan, version)])

    sync(1)
    staging = [t.data_ptr() for t in sender._group._staging]
    allocations = receiver.buffers.allocations
    for version in (2, 3):
        results = sync(version)
        assert all(torch.equal(results[1][n], t) for n, t in tensors)
    assert [t.data_ptr() for t in sender._group._staging] == staging and len(staging) == 2
    assert receiver.buffers.allocations == allocations


def test_a_bucket_never_lands_on_views_the_loader_still_holds():
    """vLLM's layer-wise loader keeps views until a whole layer has arrived, across buckets."""
    sender = WeightSender(bucket_bytes=1024)
    (receiver,) = form_group(sender, 1)
    tensors = [(f"w{i}", torch.full((256,), float(i))) for i in range(16)]  # one equal-size bucket each
    plan = sender.plan(weight_meta(tensors))
    assert len(plan.buckets) == 16

    def load_holding_views(version: int, hold: int = 5) -> list[str]:
        held: list[tuple[str, torch.Tensor]] = []
        overwritten = []
        for name, tensor in receive_buckets(receiver, plan, version):
            held = (held + [(name, tensor)])[-hold:]
            overwritten += [n for n, t in held if not torch.all(t == float(n[1:]))]
        return overwritten

    for version in (1, 2):
        results = run_ranks([lambda: sender.send(iter(tensors), version), lambda: load_holding_views(version)])
        assert results[0].bytes == plan.total_bytes and results[1] == []


def test_a_stale_plan_or_version_fails_on_every_rank_without_hanging():
    sender = WeightSender(bucket_bytes=BUCKET_BYTES)
    (receiver,) = form_group(sender, 1)
    tensors = model_tensors()
    plan = sender.plan(weight_meta(tensors))
    stale = plan_buckets(weight_meta(tensors), BUCKET_BYTES * 4)
    results = run_ranks([lambda: sender.send(iter(tensors), 3), lambda: receive_all(receiver, stale, 3)])
    assert isinstance(results[0], WeightSyncError) and "disagree" in str(results[0])
    assert isinstance(results[1], WeightSyncError) and "disagree" in str(results[1])
    results = run_ranks([lambda: sender.send(iter(tensors), 4), lambda: receive_all(receiver, plan, 5)])
    assert all(isinstance(r, WeightSyncError) for r in results), results
    # the group is still usable
    results = run_ranks([lambda: sender.send(iter(tensors), 6), lambda: receive_all(receiver, plan, 6)])
    assert torch.equal(results[1]["embed.weight"], tensors[-3][1])


def test_a_tensor_that_breaks_the_plan_aborts_the_sync_on_every_rank():
    sender = WeightSender(bucket_bytes=BUCKET_BYTES)
    (receiver,) = form_group(sender, 1)
    tensors = model_tensors()
    plan = sender.plan(weight_meta(tensors))
    wrong_shape = list(tensors)
    wrong_shape[5] = (tensors[5][0], torch.zeros(2, 2))
    loaded: list[str] = []

    def load_until_error() -> None:
        weights = receive_buckets(receiver, plan, 1)
        try:
            for name, _ in weights:
                loaded.append(name)
        finally:
            drain(weights)

    results = run_ranks([lambda: sender.send(iter(wrong_shape), 1), load_until_error])
    assert isinstance(results[0], WeightSyncError) and "layers.5.weight" in str(results[0])
    assert isinstance(results[1], WeightSyncError) and "aborted" in str(results[1])
    assert "layers.5.weight" not in loaded  # nothing from the broken bucket reached the loader
    # too many tensors: the receivers got everything in the plan, the sender reports the extra
    extra = tensors + [("unplanned", torch.zeros(1))]
    results = run_ranks([lambda: sender.send(iter(extra), 2), lambda: receive_all(receiver, plan, 2)])
    assert isinstance(results[0], WeightSyncError) and "unplanned" in str(results[0])
    assert set(results[1]) == {n for n, _ in tensors}


def test_a_late_joiner_is_brought_up_to_date_by_re_forming_the_group():
    sender = WeightSender(bucket_bytes=BUCKET_BYTES)
    first_address = sender.address()
    (early,) = form_group(sender, 1)
    tensors = model_tensors(seed=11)
    plan = sender.plan(weight_meta(tensors))
    results = run_ranks([lambda: sender.send(iter(tensors), 1), lambda: receive_all(early, plan, 1)])
    assert torch.equal(results[1]["layers.0.weight"], tensors[0][1])

    # a second receiver arrives at version 0: a fresh rendezvous, a bigger world, the same version again
    assert sender.address() != first_address
    early2, late = form_group(sender, 2)
    assert sender.world_size == 3
    results = run_ranks(
        [lambda: sender.send(iter(tensors), 1)] + [lambda g=g: receive_all(g, plan, 1) for g in (early2, late)]
    )
    for received in results[1:]:
        assert all(torch.equal(received[n], t) for n, t in tensors)


def test_sender_refuses_to_send_out_of_order():
    sender = WeightSender(bucket_bytes=BUCKET_BYTES)
    with pytest.raises(RuntimeError, match="before join"):
        sender.send([], 1)
    with pytest.raises(ValueError, match="at least one receiver"):
        sender.join(1)
    with pytest.raises(ValueError, match="outside a group"):
        join_group("127.0.0.1", 1, 3, 2, "gloo", secret="s")
    with pytest.raises(ValueError, match="'gloo' or 'nccl'"):
        join_group("127.0.0.1", 1, 1, 2, "mpi", secret="s")


def transformer_like(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    tensors = [("embed.weight", torch.randn(1024, 512, generator=g))]  # every matrix >= DIRECT_MIN_BYTES
    for i in range(6):
        tensors += [(f"layers.{i}.q.weight", torch.randn(512, 512, generator=g)),
                    (f"layers.{i}.q.bias", torch.randn(500, generator=g)),  # packing aligns: not as in memory
                    (f"layers.{i}.mlp.weight", torch.randn(1024, 512, generator=g)),
                    (f"layers.{i}.norm.weight", torch.randn(500, generator=g))]
    return tensors


def test_memory_that_lies_as_planned_is_sent_without_a_copy_and_moved_memory_still_arrives():
    """ZeRO-1/2 parameters are views of flat buffers: a plan with their places sends those buffers'
    bytes as they lie (only runs under DIRECT_MIN_BYTES are copied), in the module's order; memory
    that moved since the plan (a parameter re-allocated) is copied instead, and arrives the same."""
    sender = WeightSender(bucket_bytes=4 << 20)
    (receiver,) = form_group(sender, 1)
    tensors = zero2_like(transformer_like(seed=0))
    plan = sender.plan(weight_meta(tensors), tensor_places(tensors))
    assert max(len(b.segments) for b in plan.buckets) == 2  # the matrices' run and the packed vectors
    vectors = sum(t.numel() * 4 for _, t in tensors if t.dim() < 2)
    for version, streamed in ((1, tensors), (2, [(n, t.clone()) for n, t in tensors])):
        results = run_ranks([lambda: sender.send(iter(streamed), version, in_place=True),
                             lambda: receive_all(receiver, plan, version)])
        assert list(results[1]) == [n for n, _ in tensors]
        assert all(torch.equal(results[1][n], t) for n, t in tensors)
        if version == 1:
            assert results[0].staged <= vectors  # no matrix copied
        else:  # runs of several matrices no longer lie as planned (a lone tensor still may)
            assert results[0].staged > 2 * vectors


def test_a_broken_stream_aborts_a_sync_sent_from_memory_and_the_group_stays_usable():
    sender = WeightSender(bucket_bytes=4 << 20)
    (receiver,) = form_group(sender, 1)
    tensors = zero2_like(transformer_like(seed=1))
    plan = sender.plan(weight_meta(tensors), tensor_places(tensors))
    broken = [(n, t[:-1] if n == "layers.4.mlp.weight" else t) for n, t in tensors]
    results = run_ranks([lambda: sender.send(iter(broken), 1, in_place=True), lambda: receive_all(receiver, plan, 1)])
    assert isinstance(results[0], WeightSyncError) and "layers.4.mlp.weight" in str(results[0])
    assert isinstance(results[1], WeightSyncError) and "aborted" in str(results[1])
    results = run_ranks([lambda: sender.send(iter(tensors), 2, in_place=True), lambda: receive_all(receiver, plan, 2)])
    assert all(torch.equal(results[1][n], t) for n, t in tensors)


def test_empty_tensors_are_planned_and_arrive_empty():
    sender = WeightSender(bucket_bytes=BUCKET_BYTES)
    (receiver,) = form_group(sender, 1)
    tensors = [("empty", torch.zeros(0)), ("w", torch.randn(4, 4)), ("none", torch.zeros(0, 3))]
    plan = sender.plan(weight_meta(tensors), tensor_places(tensors))
    for version, in_place in ((1, False), (2, True)):
        results = run_ranks([lambda: sender.send(iter(tensors), version, in_place=in_place),
                             lambda: receive_all(receiver, plan, version)])
        assert [tuple(results[1][n].shape) for n, _ in tensors] == [(0,), (4, 4), (0, 3)]
        assert torch.equal(results[1]["w"], tensors[1][1])
    empties = [("a", torch.zeros(0)), ("b", torch.zeros(2, 0))]  # a bucket with nothing to send
    plan = sender.plan(weight_meta(empties))
    assert plan.buckets[0].segments == ()
    results = run_ranks([lambda: sender.send(iter(empties), 3), lambda: receive_all(receiver, plan, 3)])
    assert [tuple(t.shape) for t in results[1].values()] == [(0,), (2, 0)]


def test_a_stream_that_fails_midway_aborts_the_sync_on_every_rank():
    """A ZeRO-3 gather that raises: the receivers must hear ABORT, not wait for the timeout."""
    sender = WeightSender(bucket_bytes=BUCKET_BYTES)
    (receiver,) = form_group(sender, 1)
    tensors = model_tensors()
    plan = sender.plan(weight_meta(tensors))

    def failing():
        yield from tensors[:5]
        raise RuntimeError("gather failed")

    results = run_ranks([lambda: sender.send(failing(), 1), lambda: receive_all(receiver, plan, 1)])
    assert isinstance(results[0], RuntimeError) and "gather failed" in str(results[0])
    assert isinstance(results[1], WeightSyncError) and "aborted" in str(results[1])
    results = run_ranks([lambda: sender.send(iter(tensors), 2), lambda: receive_all(receiver, plan, 2)])
    assert all(torch.equal(results[1][n], t) for n, t in tensors)
