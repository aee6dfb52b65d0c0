"""Moving policy weights from the learner to rollout engines: bucket plans and a dedicated group.

Pure torch (no Ray, no vLLM): the learner's sender (``learner/weight_sender.py``), the vLLM worker
extension (``actors/vllm_worker.py``) and the benchmark all build on these pieces.

Why buckets: one broadcast per parameter pays a collective's fixed latency hundreds of times
(a Qwen2.5-VL has ~700 tensors); one broadcast of the whole model needs a second full copy of
it on both ends. A bucket plan packs parameters, in the order the sender will stream them, into
flat byte buffers of about ``bucket_bytes``; the receiver turns each buffer back into views with
the parameters' Hugging Face names and shapes. The plan is a plain JSON-able dict, computed once
on the sender and handed to every receiver with the control call of a sync.

Why a dedicated group: the learner's ranks already form DeepSpeed's default process group, and
the rollout workers live in other processes (and on other nodes) with vLLM's own groups. A
rendezvous store served from the learner's node (``segr1.weightsync.rendezvous``: bound to the address the
group uses, open only to holders of the job's secret) plus a ``ProcessGroupGloo`` /
``ProcessGroupNCCL`` built on it joins learner rank 0 (rank 0) and every rollout engine worker
(ranks 1..N) without touching anyone's default group.

Stream framing: a sync opens with a handshake (the sender announces version and plan digest, all
ranks vote, so a stale plan fails on every rank at once instead of hanging the sender). Each
bucket then goes out as a small header ``[status, bucket index]`` followed by its segments: if the
sender's tensors stop matching the plan, it still sends that bucket, marked ABORT, so every posted
receive completes, the group stays usable, and each receiver raises a clear error instead of
loading a half-written model or waiting for the collective's timeout.

Why segments: a learner's parameters often already lie side by side in memory (DeepSpeed ZeRO-1/2
keeps each parameter group in one flat buffer and makes every parameter a view of it). A plan made
with the tensors' ``places`` lays such a run out in the bucket exactly as it lies in memory, as one
segment, and the sender broadcasts that stretch of memory as it is: no copy into a staging buffer,
whose memory traffic competes with the wire and the receiver's own copy. Tensors that are small or
scattered share one packed segment per bucket, copied as before.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist

from segr1.weightsync.rendezvous import RendezvousStore

ALIGN_BYTES = 64  # every tensor starts on a 64-byte boundary, so dtype views of the buffer are legal
HEADER_BYTES = 64  # each bucket's buffer starts with [status, bucket index] as int64, sent first
DIRECT_MIN_BYTES = 1 << 20  # a shorter run of memory is copied (one more broadcast costs more), unless
# it is a quarter of the plan's bucket size
DEFAULT_BUCKET_BYTES = 256 << 20
HEADER_OK = 1
HEADER_ABORT = 0

_DTYPES = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.float32, torch.float16, torch.bfloat16, torch.float64,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}


class WeightSyncError(RuntimeError):
    """A sync could not be completed; the message says which bucket and why."""


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype} cannot be sent as weights (supported: {sorted(_DTYPES)})")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype name {name!r} in bucket plan") from None


@dataclass(frozen=True)
class TensorSlot:
    """Where one named tensor lives inside its bucket's flat byte buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int
    # derived once, so the per-tensor work of a sync is a single as_strided call
    torch_dtype: torch.dtype = field(init=False, repr=False, compare=False)
    stride: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "torch_dtype", dtype_from_name(self.dtype))
        stride, step = [], 1
        for d in reversed(self.shape):
            stride.append(step)
            step *= d
        object.__setattr__(self, "stride", tuple(reversed(stride)))


@dataclass(frozen=True)
class Bucket:
    """``segments``: ``(start, nbytes)`` stretches of the payload, each sent as one broadcast; a
    slot lies inside exactly one of them."""

    nbytes: int
    slots: tuple[TensorSlot, ...]
    segments: tuple[tuple[int, int], ...]
    # the slots of each segment (indices into ``slots``), derived once
    segment_slots: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        members: list[list[int]] = [[] for _ in self.segments]
        for i, slot in enumerate(self.slots):
            if slot.nbytes == 0:  # an empty tensor has no bytes to send or copy
                continue
            end = slot.offset + slot.nbytes
            inside = [k for k, (start, n) in enumerate(self.segments) if start <= slot.offset and end <= start + n]
            if len(inside) != 1:
                raise ValueError(f"tensor {slot.name!r} (bytes {slot.offset}..{end}) is not inside one segment")
            members[inside[0]].append(i)
        object.__setattr__(self, "segment_slots", tuple(tuple(m) for m in members))


@dataclass(frozen=True)
class BucketPlan:
    """The order, shapes, dtypes and byte offsets of every tensor of a sync, bucket by bucket."""

    buckets: tuple[Bucket, ...]

    @property
    def num_tensors(self) -> int:
        return sum(len(b.slots) for b in self.buckets)

    @property
    def total_bytes(self) -> int:
        """Bytes on the wire, alignment padding included."""
        return sum(b.nbytes for b in self.buckets)

    def names(self) -> list[str]:
        return [s.name for b in self.buckets for s in b.slots]

    def to_json(self) -> dict:
        return {
            "buckets": [
                {
                    "nbytes": b.nbytes,
                    "slots": [[s.name, list(s.shape), s.dtype, s.offset, s.nbytes] for s in b.slots],
                    "segments": [list(segment) for segment in b.segments],
                }
                for b in self.buckets
            ]
        }

    @classmethod
    def from_json(cls, data: dict) -> BucketPlan:
        try:
            buckets = tuple(
                Bucket(
                    nbytes=int(b["nbytes"]),
                    slots=tuple(
                        TensorSlot(str(n), tuple(int(x) for x in shape), str(dt), int(off), int(nb))
                        for n, shape, dt, off, nb in b["slots"]
                    ),
                    segments=tuple((int(start), int(n)) for start, n in b["segments"]),
                )
                for b in data["buckets"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed bucket plan: {exc!r}") from exc
        return cls(buckets)

    def digest(self) -> int:
        """A 62-bit fingerprint both ends compare, so a stale or foreign plan fails loudly."""
        raw = json.dumps(self.to_json(), separators=(",", ":")).encode()
        return int.from_bytes(hashlib.sha256(raw).digest()[:8], "little") >> 2


def _aligned(n: int) -> int:
    return (n + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


Place = tuple[int, int]  # where a tensor lies in memory: (its storage's address, byte offset)


def tensor_places(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Place]:
    """Where each contiguous tensor lies in memory, for ``plan_buckets`` (a strided view cannot be
    sent as one stretch of memory, so it has no place)."""
    return {
        name: (t.untyped_storage().data_ptr(), t.storage_offset() * t.element_size())
        for name, t in named_tensors
        if t.is_contiguous()
    }


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


def plan_buckets(
    metas: Iterable[tuple[str, Iterable[int], torch.dtype | str]],
    bucket_bytes: int,
    places: dict[str, Place] | None = None,
) -> BucketPlan:
    """Pack ``(name, shape, dtype)`` entries, in order, into buckets of about ``bucket_bytes``.

    A tensor larger than ``bucket_bytes`` gets a bucket of its own. Order is kept because the
    sender streams tensors (e.g. gathered one ZeRO-3 module at a time) in exactly this order.
    With ``places`` (``tensor_places`` of the tensors the sender will stream), the tensors of a
    bucket that lie side by side in one storage, at least ``DIRECT_MIN_BYTES`` or a quarter of
    the bucket, form a segment laid out as they lie in memory; the others share one packed segment.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    entries = _entries(metas)
    if not entries:
        raise ValueError("no tensors to plan: the weights iterable was empty")
    min_run = min(DIRECT_MIN_BYTES, bucket_bytes // 4)
    return BucketPlan(tuple(_layout(group, places or {}, min_run) for group in _cut(entries, bucket_bytes)))


def _entries(metas: Iterable[tuple[str, Iterable[int], torch.dtype | str]]) -> list[_Entry]:
    entries, seen = [], set()
    for name, shape, dtype in metas:
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice in the weights to send")
        seen.add(name)
        dt = dtype if isinstance(dtype, str) else dtype_name(dtype)
        dims = tuple(int(d) for d in shape)
        entries.append(_Entry(name, dims, dt, _numel(dims) * torch.empty((), dtype=dtype_from_name(dt)).element_size()))
    return entries


def _cut(entries: list[_Entry], bucket_bytes: int) -> list[list[_Entry]]:
    groups: list[list[_Entry]] = [[]]
    used = 0
    for entry in entries:
        if groups[-1] and used + entry.nbytes > bucket_bytes:
            groups.append([])
            used = 0
        groups[-1].append(entry)
        used = _aligned(used + entry.nbytes)
    return groups


def _layout(group: list[_Entry], places: dict[str, Place], min_run: int) -> Bucket:
    """Offsets of one bucket's tensors: runs of memory first (each a segment, as it lies), then
    the rest packed one after the other (one more segment)."""
    offsets: dict[str, int] = {}
    segments: list[tuple[int, int]] = []
    used = 0
    for run in _runs(group, places, min_run):
        low = places[run[0].name][1]
        span = max(places[e.name][1] + e.nbytes for e in run) - low
        offsets.update((e.name, used + places[e.name][1] - low) for e in run)
        segments.append((used, span))
        used = _aligned(used + span)
    packed_start = used
    for entry in group:
        if entry.name not in offsets:
            offsets[entry.name] = used
            used = _aligned(used + entry.nbytes)
    if used > packed_start:
        segments.append((packed_start, used - packed_start))
    slots = tuple(TensorSlot(e.name, e.shape, e.dtype, offsets[e.name], e.nbytes) for e in group)
    return Bucket(used, slots, tuple(segments))


def _runs(group: list[_Entry], places: dict[str, Place], min_run: int) -> list[list[_Entry]]:
    """The bucket's tensors of one storage and dtype that tile a stretch of memory (gaps of
    alignment only, no overlap) of at least ``min_run`` bytes."""
    by_storage: dict[tuple[int, str], list[_Entry]] = {}
    for entry in group:
        if entry.name in places:
            by_storage.setdefault((places[entry.name][0], entry.dtype), []).append(entry)
    runs = []
    for members in by_storage.values():
        ordered = sorted(members, key=lambda e: places[e.name][1])
        starts = [places[e.name][1] for e in ordered]
        ends = [start + e.nbytes for start, e in zip(starts, ordered)]
        tiled = all(0 <= nxt - end < ALIGN_BYTES for end, nxt in zip(ends, starts[1:]))
        if tiled and ends[-1] - starts[0] >= min_run:
            runs.append(ordered)
    return runs


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def bucket_views(bucket: Bucket, payload: torch.Tensor) -> list[torch.Tensor]:
    """One view of ``payload`` (uint8, the bucket's bytes) per slot, with its dtype and shape.

    The payload is reinterpreted once per dtype; each tensor is then one ``as_strided`` (a
    slice-view-view per tensor costs three times as much, which shows with ~10^4 tensors).
    """
    typed: dict[torch.dtype, torch.Tensor] = {}
    views = []
    for slot in bucket.slots:
        base = typed.get(slot.torch_dtype)
        if base is None:
            base = typed[slot.torch_dtype] = payload[: bucket.nbytes].view(slot.torch_dtype)
        start = base.storage_offset() + slot.offset // base.element_size()  # as_strided counts from the storage
        views.append(base.as_strided(slot.shape, slot.stride, start))
    return views


def check_tensor(slot: TensorSlot, name: str, tensor: torch.Tensor) -> None:
    """Raise WeightSyncError unless ``(name, tensor)`` is what the plan expects at this slot."""
    if name != slot.name:
        raise WeightSyncError(f"expected tensor {slot.name!r} next, got {name!r}")
    if tensor.shape != slot.shape or tensor.dtype != slot.torch_dtype:
        raise WeightSyncError(
            f"tensor {name!r}: plan says {slot.dtype}{list(slot.shape)}, "
            f"got {dtype_name(tensor.dtype)}{list(tensor.shape)}"
        )


@torch.no_grad()
def flatten(bucket: Bucket, tensors: list[torch.Tensor], buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Copy ``tensors`` (in slot order) into one uint8 buffer of ``bucket.nbytes``."""
    if buffer is None:
        buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=tensors[0].device)
    for view, tensor in zip(bucket_views(bucket, buffer), tensors, strict=True):
        view.copy_(tensor)
    return buffer[: bucket.nbytes]


def unflatten(bucket: Bucket, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Views of ``buffer`` with each slot's name, shape and dtype (no copy)."""
    return [(slot.name, view) for slot, view in zip(bucket.slots, bucket_views(bucket, buffer))]


# ----------------------------------------------------------------------------------------------
# The dedicated collective group


class BufferCache:
    """A receiver's byte buffers, kept from one bucket (and one sync) to the next.

    On CPU, a fresh buffer of tens of MB costs more than sending it: the kernel maps and zeroes
    every page on first touch (measured here: 0.37 s for 17 fresh 16 MB buffers, 0.06 s to refill
    one). A buffer is handed out again only when nothing references its memory any more: the
    receiving loader may hold views of a bucket until a whole layer has arrived. That check uses
    the storage's reference count, calibrated on a fresh buffer; without that (private) torch
    call every buffer is fresh, which is slower but never wrong. On CUDA nothing is kept: the
    caching allocator already reuses blocks cheaply.
    """

    def __init__(self, device: torch.device, keep: int | None = None) -> None:
        self.device = device
        self.keep = keep if keep is not None else (4 if device.type == "cpu" else 0)
        self._buffers: list[torch.Tensor] = []
        self.allocations = 0  # fresh buffers made so far (steady state: none per sync)
        self._use_count = getattr(torch._C, "_storage_Use_Count", None)
        self._baseline = self._count(torch.empty(1, dtype=torch.uint8, device=device))

    def _count(self, buffer: torch.Tensor) -> int | None:
        if self._use_count is None:
            return None
        return int(self._use_count(buffer.untyped_storage()._cdata))

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of ``nbytes`` that nobody else references; it stays cached for reuse."""
        free = [
            i for i, b in enumerate(self._buffers)
            if b.numel() >= nbytes and self._baseline is not None and self._count(b) == self._baseline
        ]
        if free:  # the smallest that fits, so a big buffer stays free for the big bucket
            buffer = self._buffers.pop(min(free, key=lambda i: self._buffers[i].numel()))
            self._buffers.append(buffer)  # most recently used last
            return buffer[:nbytes]
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.allocations += 1
        self._buffers.append(buffer)
        if len(self._buffers) > self.keep:
            self._buffers.pop(0)  # if still referenced, it is freed when its last view dies
        return buffer[:nbytes]


@dataclass
class WeightGroup:
    """One rank's handle on the learner-to-rollout group; rank 0 is the learner's sender."""

    pg: dist.ProcessGroup
    rank: int
    world_size: int
    device: torch.device
    store: dist.Store
    buffers: BufferCache  # receive buffers
    _staging: list[torch.Tensor] = field(default_factory=list)  # the sender's two, on CPU

    def broadcast(self, tensor: torch.Tensor) -> dist.Work:
        """Asynchronous broadcast from rank 0; call ``.wait()`` on the result."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        return self.pg.broadcast([tensor], opts)

    def staging(self, side: int, nbytes: int) -> torch.Tensor:
        """Sender buffer 0 or 1. Kept (and grown) on CPU, where a fresh one page-faults; on CUDA
        the caching allocator makes a fresh one cheap and nothing stays reserved between syncs."""
        if self.device.type != "cpu":
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        while len(self._staging) <= side:
            self._staging.append(torch.empty(0, dtype=torch.uint8))
        if self._staging[side].numel() < nbytes:
            self._staging[side] = torch.empty(nbytes, dtype=torch.uint8)
        return self._staging[side][:nbytes]


def join_group(
    host: str,
    port: int,
    rank: int,
    world_size: int,
    backend: str,
    *,
    secret: str,
    local_host: str = "127.0.0.1",
    timeout_s: float = 1800.0,
    prefix: str = "segr1-weights",
) -> WeightGroup:
    """Join the group whose ``RendezvousServer`` is at ``host:port`` as ``rank`` of ``world_size``;
    blocks until all have.

    Every rank, the server's own included, connects as a client proving ``secret`` (the job's);
    a wrong one raises ``RendezvousRefused`` here. ``backend`` is "gloo" (CPU tensors;
    ``local_host`` is the address this rank's gloo device binds to, reachable from the other
    ranks) or "nccl" (tensors on the current CUDA device).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of {world_size}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"weight sync backend must be 'gloo' or 'nccl', got {backend!r}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = RendezvousStore(host, port, secret, timeout)
    prefixed = dist.PrefixStore(prefix, store)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, opts)
        device = torch.device("cpu")
    elif backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
        device = torch.device("cuda", torch.cuda.current_device())
    group = WeightGroup(pg, rank, world_size, device, store, BufferCache(device))
    # One tiny collective makes the join blocking for every rank (NCCL connects lazily).
    group.broadcast(torch.zeros(1, dtype=torch.int64, device=device)).wait()
    return group


# ----------------------------------------------------------------------------------------------
# Streaming a plan over a group


def _handshake(group: WeightGroup, plan: BucketPlan, version: int) -> None:
    """Agree on (version, plan) before any bucket moves, so a mismatch fails on every rank at once.

    Rank 0 announces its version and plan digest; every rank votes on whether its own matches;
    an all-reduce (max) of the votes tells everyone. Without the vote a receiver holding a stale
    plan would post buffers of the wrong sizes and the sender would block until the timeout.
    """
    announced = torch.tensor(
        [version, plan.digest(), len(plan.buckets), plan.total_bytes], dtype=torch.int64, device=group.device
    )
    mine = announced.clone()
    group.broadcast(announced).wait()
    vote = torch.tensor([int(not torch.equal(announced, mine))], dtype=torch.int64, device=group.device)
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MAX
    group.pg.allreduce([vote], opts).wait()
    if int(vote.item()):
        sent_version, sent_digest = (int(x) for x in announced[:2].tolist())
        raise WeightSyncError(
            f"rank {group.rank}: the ranks disagree on the sync (sender: version {sent_version}, "
            f"plan {sent_digest:x}; this rank: version {version}, plan {plan.digest():x})"
        )


def _header(buffer: torch.Tensor) -> torch.Tensor:
    return buffer[:HEADER_BYTES].view(torch.int64)[:2]


class Sent(NamedTuple):
    bytes: int  # payload bytes broadcast
    staged: int  # of which copied into a staging buffer first; the rest left from the tensors' memory


def send_buckets(
    group: WeightGroup,
    plan: BucketPlan,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    version: int,
    *,
    in_place: bool = False,
) -> Sent:
    """Broadcast ``named_tensors`` (rank 0) bucket by bucket.

    Without ``in_place`` each tensor is copied into a staging buffer as soon as the iterable yields
    it (a ZeRO-3 gather may free it right after). With ``in_place`` (the tensors stay valid and
    unchanged until this returns: a module's own parameters) a segment whose tensors lie in memory
    as planned is broadcast from there, and only the others are copied. Two staging buffers, kept
    for the next sync on CPU, let staging bucket k+1 overlap the broadcast of bucket k. If a
    tensor does not match the plan, the bucket goes out with an ABORT header (receivers raise,
    the group stays in step) and this raises WeightSyncError.
    """
    _handshake(group, plan, version)
    stream = iter(named_tensors)
    in_flight: list[list[dist.Work]] = [[], []]
    staged = 0
    for index, bucket in enumerate(plan.buckets):
        side = index % 2
        for work in in_flight[side]:  # this side's previous bucket must have left
            work.wait()
        buffer = group.staging(side, HEADER_BYTES + bucket.nbytes)
        try:
            sources, copied = _stage(stream, bucket, buffer[HEADER_BYTES:], in_place)
        except Exception as exc:  # a broken stream or a failed gather: every receiver must hear of it
            _header(buffer).copy_(torch.tensor([HEADER_ABORT, index]))
            for work in [*in_flight[1 - side], *_broadcast_bucket(group, bucket, buffer)]:
                work.wait()
            if not isinstance(exc, WeightSyncError):
                raise
            raise WeightSyncError(f"sync of version {version} aborted at bucket {index}: {exc}") from exc
        staged += copied
        _header(buffer).copy_(torch.tensor([HEADER_OK, index]))
        in_flight[side] = _broadcast_bucket(group, bucket, buffer, sources)
    for works in in_flight:
        for work in works:
            work.wait()
    leftover = next(stream, None)
    if leftover is not None:
        raise WeightSyncError(
            f"tensor {leftover[0]!r} is not in the bucket plan of version {version} "
            "(the receivers loaded everything the plan named)"
        )
    return Sent(plan.total_bytes, staged)


def _broadcast_bucket(
    group: WeightGroup, bucket: Bucket, buffer: torch.Tensor, sources: list[torch.Tensor] | None = None
) -> list[dist.Work]:
    """The header, then each segment: from ``sources`` where given, else from the buffer's payload."""
    segments = _payload_segments(bucket, buffer[HEADER_BYTES:]) if sources is None else sources
    return [group.broadcast(buffer[:HEADER_BYTES]), *(group.broadcast(segment) for segment in segments)]


def _payload_segments(bucket: Bucket, payload: torch.Tensor) -> list[torch.Tensor]:
    return [payload[start : start + n] for start, n in bucket.segments]


@torch.no_grad()  # parameters require grad; copying them must not build a graph
def _stage(
    stream: Iterator[tuple[str, torch.Tensor]], bucket: Bucket, payload: torch.Tensor, in_place: bool
) -> tuple[list[torch.Tensor] | None, int]:
    """Take the bucket's tensors from the stream; returns what each segment is sent from (None: all
    from ``payload``), and the bytes copied into ``payload`` to get there."""
    views = bucket_views(bucket, payload)
    tensors = []
    for slot, view in zip(bucket.slots, views):
        item = next(stream, None)
        if item is None:
            raise WeightSyncError(f"the weights ran out before {slot.name!r}")
        name, tensor = item
        check_tensor(slot, name, tensor)
        if in_place:
            tensors.append(tensor)
        else:
            view.copy_(tensor)
    if not in_place:
        return None, sum(s.nbytes for s in bucket.slots)
    sources, copied = [], 0
    staged = _payload_segments(bucket, payload)
    for (start, n), members, segment in zip(bucket.segments, bucket.segment_slots, staged):
        memory = _as_planned(bucket, members, tensors, start, n, payload.device)
        if memory is None:
            for i in members:
                views[i].copy_(tensors[i])
                copied += bucket.slots[i].nbytes
            memory = segment
        sources.append(memory)
    return sources, copied


def _as_planned(
    bucket: Bucket, members: tuple[int, ...], tensors: list[torch.Tensor], start: int, nbytes: int,
    device: torch.device,
) -> torch.Tensor | None:
    """The ``nbytes`` of memory holding a segment's tensors where the plan puts them, as a uint8
    tensor on the group's ``device``; None when they do not lie so (another storage or device,
    moved since the plan, a strided view)."""
    if not members:
        return None
    first = tensors[members[0]]
    if first.device != device:
        return None
    storage = first.untyped_storage()
    base = first.storage_offset() * first.element_size() - (bucket.slots[members[0]].offset - start)
    if base < 0 or base + nbytes > storage.nbytes():
        return None
    for i in members:
        tensor = tensors[i]
        if (
            not tensor.is_contiguous()
            or tensor.untyped_storage().data_ptr() != storage.data_ptr()
            or tensor.storage_offset() * tensor.element_size() != base + bucket.slots[i].offset - start
        ):
            return None
    return torch.empty(0, dtype=torch.uint8, device=first.device).set_(storage, base, (nbytes,))


def receive_buckets(
    group: WeightGroup, plan: BucketPlan, version: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the plan as its bucket arrives (rank > 0).

    The receive of bucket k+1 is posted before bucket k's tensors are handed out, so loading
    them overlaps the transfer. A bucket's buffer is reused only once no view of it is alive
    (a loader may keep views until a whole layer has arrived). Consume the iterator to the end
    (see ``drain``) even if loading fails, or the sender stays blocked.
    """
    _handshake(group, plan, version)
    posted = _post_receive(group, plan.buckets[0])
    for index, bucket in enumerate(plan.buckets):
        works, buffer = posted
        for work in works:
            work.wait()
        status, sent_index = (int(x) for x in _header(buffer).tolist())
        if status != HEADER_OK:
            raise WeightSyncError(f"the sender aborted the sync of version {version} at bucket {index}")
        if sent_index != index:
            raise WeightSyncError(f"expected bucket {index} of version {version}, got bucket {sent_index}")
        if index + 1 < len(plan.buckets):
            posted = _post_receive(group, plan.buckets[index + 1])
        yield from unflatten(bucket, buffer[HEADER_BYTES:])


def _post_receive(group: WeightGroup, bucket: Bucket) -> tuple[list[dist.Work], torch.Tensor]:
    buffer = group.buffers.take(HEADER_BYTES + bucket.nbytes)
    return _broadcast_bucket(group, bucket, buffer), buffer


def drain(weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Receive (and drop) whatever is left of a sync so the group stays in step with the sender."""
    for _ in weights:
        pass
