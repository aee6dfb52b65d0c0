"""Time one weight sync four ways over a real gloo group between processes.

    python benchmarks/weight_sync.py [--layers 96 --hidden 256 --receivers 1 --bucket-mb 16 64 256]

The synthetic model is shaped like a small transformer with many small tensors (per layer: q, k,
v, o, gate, up, down matrices, two norms and three biases), a few hundred MB in float32, and the
sender holds it as the learner does below ZeRO-3: views of one flat buffer per parameter group
(matrices; norms and biases), as DeepSpeed ZeRO-1/2 keeps a module's parameters. Each rank is its
own process; rank 0 sends, the others receive and copy into their own copy of the model (the copy
a real engine does while loading). Every timed sync starts and ends with a one-number all-reduce,
so the time covers the slowest receiver.

Modes:
  flat       one broadcast of one buffer holding every byte (the wire's raw bandwidth; the
             receiver does not even unpack it)
  in place   segr1.weightsync.weight_sync.send_buckets / receive_buckets at each bucket size, the
             production path: a plan made with the tensors' places, sent in place (runs of memory
             go out as they lie, no staging copy); handshake, headers, overlap included
  staged     the same with a plan that knows no places: every byte copied into a staging buffer
             first (the path before runs of memory were sent in place; ZeRO-3's path today)
  per-param  one broadcast per tensor, no packing; the receiver copies each tensor from the
             scratch tensor it landed in into its model (as a loader must)

Two more rows say where the time over flat goes: ``flat + copy`` (flat, then the receiver copies
the buffer into its model) and ``in place, no copy`` (the production path with the receiver's copy
left out: a receiver that drops what it gets).

The last line is JSON: ``bucketed_over_flat`` (best in-place bucket size over flat; goal <= 1.2),
``per_param_over_bucketed`` (goal >= 3), the staged path's ``staged_over_flat`` beside them, and
``bucketed_over_flat_and_copy`` and ``no_copy_over_flat``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segr1.testing.layouts import zero2_like  # noqa: E402
from segr1.weightsync.rendezvous import RendezvousServer, new_secret  # noqa: E402
from segr1.weightsync.weight_sync import (  # noqa: E402
    WeightGroup,
    drain,
    join_group,
    plan_buckets,
    receive_buckets,
    send_buckets,
    tensor_places,
)


def synthetic_model(layers: int, hidden: int, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    mlp = hidden * 11 // 4
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (4 * hidden, hidden))]
    for i in range(layers):
        p = f"layers.{i}."
        shapes += [
            (p + "q.weight", (hidden, hidden)), (p + "q.bias", (hidden,)),
            (p + "k.weight", (hidden // 4, hidden)), (p + "k.bias", (hidden // 4,)),
            (p + "v.weight", (hidden // 4, hidden)), (p + "v.bias", (hidden // 4,)),
            (p + "o.weight", (hidden, hidden)),
            (p + "gate.weight", (mlp, hidden)), (p + "up.weight", (mlp, hidden)), (p + "down.weight", (hidden, mlp)),
            (p + "norm1.weight", (hidden,)), (p + "norm2.weight", (hidden,)),
        ]
    return [(name, torch.randn(shape, generator=g)) for name, shape in shapes]


def _barrier(group: WeightGroup) -> None:
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.SUM
    group.pg.allreduce([torch.zeros(1)], opts).wait()


def _time_once(group: WeightGroup, fn) -> float:
    _barrier(group)
    start = time.perf_counter()
    fn()
    _barrier(group)
    return time.perf_counter() - start


def _run_rank(rank: int, world: int, port: int, secret: str, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(1)
    model = synthetic_model(args.layers, args.hidden, seed=0 if rank == 0 else 1)  # receivers start different
    dest = dict(model)
    # The sender holds the learner's memory; a receiver lays out a copy the same way only to make the
    # same plan (a job sends it the sender's; the handshake checks that the plans agree).
    laid_out = zero2_like(model)
    places = tensor_places(laid_out)
    if rank == 0:
        model = laid_out
    del laid_out
    group = join_group("127.0.0.1", port, rank, world, "gloo", secret=secret, timeout_s=600)
    total = sum(t.numel() * t.element_size() for _, t in model)
    # The model's own bytes: a buffer never written would be the kernel's shared zero page, which
    # sends faster than any real memory and would flatter the baseline.
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for _, t in model])

    # Only the receiver's side differs from flat: it copies the buffer into its model afterwards, the
    # copy every engine loader does and that flat leaves out.
    sizes = [t.numel() * t.element_size() for _, t in model]
    flat_views = [chunk.view(t.dtype).view(t.shape) for chunk, (_, t) in zip(flat.split(sizes), model)]

    def flat_and_copy() -> None:
        group.broadcast(flat).wait()
        if rank > 0:
            for (name, _), view in zip(model, flat_views):
                dest[name].copy_(view)

    modes = {"flat": lambda: group.broadcast(flat).wait(), "flat + copy": flat_and_copy}
    for kind in ("in place", "staged"):
        for mb in args.bucket_mb:
            plan = plan_buckets([(n, t.shape, t.dtype) for n, t in model], mb << 20,
                                places if kind == "in place" else None)

            def bucketed(plan=plan, in_place=kind == "in place", load=True) -> None:
                if rank == 0:
                    send_buckets(group, plan, model, version=1, in_place=in_place)
                elif load:
                    for name, tensor in receive_buckets(group, plan, version=1):
                        dest[name].copy_(tensor)
                else:
                    drain(receive_buckets(group, plan, version=1))

            modes[f"{kind} {mb} MB ({len(plan.buckets)} buckets)"] = bucketed
            if kind == "in place":
                modes[f"in place {mb} MB, no copy"] = functools.partial(bucketed, load=False)

    def per_param() -> None:
        if rank == 0:
            works = [group.broadcast(tensor) for _, tensor in model]
            for work in works:
                work.wait()
            return
        # A receiver cannot broadcast straight into an engine's parameters (vLLM stacks q/k/v,
        # shards for tensor parallelism, re-packs for the CPU kernels): each tensor lands in a
        # scratch tensor that the loader then copies, as in the bucketed mode.
        scratch = [(name, torch.empty_like(dest[name])) for name, _ in model]
        works = [group.broadcast(t) for _, t in scratch]
        for (name, t), work in zip(scratch, works):
            work.wait()
            dest[name].copy_(t)

    modes["per-param"] = per_param
    timings: dict[str, list[float]] = {mode: [] for mode in modes}
    for fn in modes.values():  # warm-up: connections, allocator, cached buffers
        fn()
    for _ in range(args.repeats):  # round-robin, so a busy moment of the machine hits every mode
        for mode, fn in modes.items():
            timings[mode].append(_time_once(group, fn))

    if rank == 1:  # the receiver's copy must equal the sender's model after all this
        reference = synthetic_model(args.layers, args.hidden, seed=0)
        results["correct"] = all(torch.equal(dest[n], t) for n, t in reference)
    if rank == 0:
        results["timings"] = timings
        results["bytes"] = total
        results["tensors"] = len(model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=96)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--receivers", type=int, default=1)
    parser.add_argument("--bucket-mb", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    world = 1 + args.receivers
    secret = new_secret()
    server = RendezvousServer("127.0.0.1", secret)  # the group's store, served from this process
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_run_rank, args=(world, server.port, secret, args, results), nprocs=world, join=True)
        results = dict(results)
    server.close()

    gb = results["bytes"] / 1e9
    print(f"model: {results['tensors']} tensors, {results['bytes'] / 2**20:.0f} MiB float32; "
          f"{args.receivers} receiver(s); median of {args.repeats} syncs; receiver copy correct: {results['correct']}")
    flat = statistics.median(results["timings"]["flat"])
    print(f"{'mode':<34} {'s/sync':>8} {'GB/s':>7} {'x flat':>7}")
    for mode, times in results["timings"].items():
        t = statistics.median(times)
        print(f"{mode:<34} {t:8.4f} {gb / t:7.2f} {t / flat:7.2f}")
    medians = {mode: statistics.median(times) for mode, times in results["timings"].items()}
    in_place = min(t for mode, t in medians.items() if mode.startswith("in place") and "no copy" not in mode)
    no_copy = min(t for mode, t in medians.items() if mode.endswith("no copy"))
    staged = min(t for mode, t in medians.items() if mode.startswith("staged"))
    figures = {
        "bucketed_over_flat": round(in_place / flat, 3),
        "per_param_over_bucketed": round(medians["per-param"] / in_place, 3),
        "staged_over_flat": round(staged / flat, 3),
        "bucketed_over_flat_and_copy": round(in_place / medians["flat + copy"], 3),
        "no_copy_over_flat": round(no_copy / flat, 3),
        "flat_s": round(flat, 4),
        "bucketed_s": round(in_place, 4),
        "correct": bool(results["correct"]),
    }
    print(f"best in place: {figures['bucketed_over_flat']:.2f}x flat (goal <= 1.2; staged: "
          f"{figures['staged_over_flat']:.2f}x), per-param / best in place: "
          f"{figures['per_param_over_bucketed']:.1f}x (goal >= 3)")
    print(f"the receiver's copy: best in place over flat + copy {figures['bucketed_over_flat_and_copy']:.2f}x, "
          f"best in place without the copy over flat {figures['no_copy_over_flat']:.2f}x")
    print(json.dumps(figures))
    return 0 if results["correct"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
