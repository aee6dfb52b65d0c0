"""Sync vs async (one-step off-policy) training loop on the same work, with the job's peak memory.

    python benchmarks/pipeline.py [--steps 6] [--prompts 4] [--max-tokens 48]

Runs the ``tiny`` preset twice on one local Ray cluster, once per mode, with the rollout and learner
roles each given a whole logical core, and prints the mean time per step and per stage side by side.
Async should approach max(rollout, train) per step rather than their sum. Peak memory is the largest
sum of resident memory over the driver and every process of the Ray session, sampled every 0.2 s.
The first step of each mode is left out of the means (engine warm-up).

The last line is JSON:
  driver_share_sync     the share of a sync step the driver spends on its own work: its CPU time
                        in the step (``driver_cpu_s``, its Ray threads included) over ``step_s``.
                        An upper bound: part of that work (handing rollouts to the reward actors)
                        overlaps the engines' generation. Goal <= 0.10.
  async_over_max_stage  the async step over max(rollout_s, train_s) of the sync run, where the
                        stages do not overlap. Goal <= 1.1.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import psutil

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class PeakMemory:
    """Samples the resident memory of this process and all its descendants (Ray's included)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)


def run_mode(mode: str, args: argparse.Namespace, out: Path) -> list[dict]:
    from segr1.config import load_config
    from segr1.train.job import build_job

    config = load_config("tiny", [
        "--trainer.mode", mode, "--trainer.steps", str(args.steps), "--trainer.output_dir", str(out / mode),
        "--trainer.prompts_per_step", str(args.prompts), "--rollout.max_tokens", str(args.max_tokens),
        "--trainer.eval_every", "0", "--trainer.sample_every", "0", "--trainer.checkpoint_every", "0",
        "--rollout.num_cpus_per_actor", "1", "--learner.num_cpus_per_worker", "1",
        "--reward.num_cpus_per_actor", "0.5",
    ])
    job = build_job(config, out / mode)
    try:
        job.trainer.fit()
    finally:
        job.shutdown()
    lines = [json.loads(line) for line in (out / mode / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "step_s" in line][1:]


def mean(lines: list[dict], key: str) -> float:
    return sum(line[key] for line in lines) / len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as memory:
        for mode in ("sync", "async"):
            results[mode] = run_mode(mode, args, Path(tmp))
    ray.shutdown()

    keys = ("step_s", "rollout_s", "train_s", "sync_s", "driver_cpu_s", "samples_per_s")
    print(f"\n{args.steps} steps x {args.prompts} prompts x G=4, max {args.max_tokens} tokens (first step excluded)")
    print(f"{'':<16}{'sync':>10}{'async':>10}{'async/sync':>12}")
    for key in keys:
        s, a = mean(results["sync"], key), mean(results["async"], key)
        print(f"{key:<16}{s:>10.3f}{a:>10.3f}{a / s:>12.2f}")
    bound = mean(results["sync"], "rollout_s") + mean(results["sync"], "train_s")
    floor = max(mean(results["sync"], "rollout_s"), mean(results["sync"], "train_s"))
    print(f"sync rollout+train = {bound:.3f} s, max(rollout, train) = {floor:.3f} s, "
          f"async step = {mean(results['async'], 'step_s'):.3f} s")
    print(f"peak resident memory of the whole job: {memory.peak / 2**30:.2f} GiB (budget 8 GiB)")
    figures = {
        "driver_share_sync": round(mean(results["sync"], "driver_cpu_s") / mean(results["sync"], "step_s"), 3),
        "async_over_max_stage": round(mean(results["async"], "step_s") / floor, 3),
        "sync_step_s": round(mean(results["sync"], "step_s"), 3),
        "async_step_s": round(mean(results["async"], "step_s"), 3),
        "max_stage_s": round(floor, 3),
        "peak_gib": round(memory.peak / 2**30, 2),
    }
    print(f"driver share of a sync step: {figures['driver_share_sync']:.3f} (goal <= 0.10); async step over "
          f"max(rollout, train): {figures['async_over_max_stage']:.2f} (goal <= 1.1)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
