"""The learner's log-probs and entropy at Qwen2.5-VL's vocabulary: peak memory and time, chunked against whole-vocabulary.

    python benchmarks/logprobs.py [--batch 4 --tokens 400 --vocab 151936 --dtype bfloat16 --repeats 3]

One micro-batch's logits (``batch x tokens x vocab``, as the policy returns them) go through the
GRPO step's log-prob work: the sampled tokens' log-probs and the entropy per position, and the
backward of a loss on both (an ``entropy_coef`` > 0 run, the heavier case).

  baseline  what the learner did before: float32 ``log_softmax`` over the whole vocabulary for the
            log-probs and again for the entropy, through torch's autograd
  chunked   ``segr1.core.logprobs.token_logprobs_and_entropy``: a chunk of rows at a time

Each variant runs in a process of its own, so its peak resident memory is its own: the figure is
the peak minus the resident memory with the logits already made, that is the memory the log-prob
work itself takes, forward and backward, the logits' gradient included. Values are compared too
(the chunked log-probs and entropies against the baseline's, the issue's goal at most 1e-5 apart;
and the gradient, which in bfloat16 may differ by a rounding step where both round a float32
value), and both ways against float64 on the first completion. At this vocabulary the baseline is
itself up to 7e-5 off float64 (torch's float32 ``log_softmax``), so nothing can be both within
1e-5 of it and within 1e-5 of float64: the float64 figures say which way is off.
Ends with one JSON line: ``peak_memory_ratio`` (chunked over baseline; goal <= 0.25),
``time_ratio`` (goal <= 1.0), ``max_abs_diff`` (to the baseline) and both ways' error to float64.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segr1.core.logprobs import token_logprobs_and_entropy  # noqa: E402


def baseline(logits: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    logp = log_probs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # the entropy's own, as the learner had it
    return logp, -(log_probs.exp() * log_probs).sum(dim=-1)


VARIANTS = {"baseline": baseline, "chunked": token_logprobs_and_entropy}


def inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.tokens)
    # Made in its own dtype: a float32 draw cast down would set the process's peak before the work starts.
    logits = torch.randn(*shape, args.vocab, generator=g, dtype=getattr(torch, args.dtype)).mul_(3).requires_grad_()
    token_ids = torch.randint(0, args.vocab, shape, generator=g)
    return logits, token_ids, torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


TRUTH_TOKENS = 128  # positions of the first completion computed in float64 too


def float64_values(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The first completion's log-probs and entropies in float64: what both float32 ways approximate."""
    logits, token_ids, _, _ = inputs(args)
    with torch.no_grad():
        log_probs = torch.log_softmax(logits[0, :TRUTH_TOKENS].double(), dim=-1)
    return {"logp": log_probs.gather(-1, token_ids[0, :TRUTH_TOKENS, None]).squeeze(-1),
            "entropy": -(log_probs.exp() * log_probs).sum(dim=-1)}


def run_one(args: argparse.Namespace) -> None:
    """In a child process: one variant, ``repeats`` times; prints its figures as JSON."""
    torch.set_num_threads(args.threads)
    logits, token_ids, w_logp, w_entropy = inputs(args)
    fn = VARIANTS[args.variant]
    before = psutil.Process().memory_info().rss
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        logp, entropy = fn(logits, token_ids)
        ((logp * w_logp).sum() + (entropy * w_entropy).sum()).backward()
        times.append(time.perf_counter() - started)
        grad, logits.grad = logits.grad, None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    torch.save({"logp": logp.detach(), "entropy": entropy.detach(), "grad": grad}, args.out)
    print(json.dumps({"peak_bytes": peak - before, "seconds": min(times)}))


def measure(args: argparse.Namespace, variant: str, out: Path) -> dict:
    command = [sys.executable, __file__, "--variant", variant, "--out", str(out), "--batch", str(args.batch),
               "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--dtype", args.dtype,
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # the child's
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_one(args)
        return
    with tempfile.TemporaryDirectory() as workdir:  # the children's outputs, to compare
        figures = {v: measure(args, v, Path(workdir) / f"{v}.pt") for v in VARIANTS}
        base, ours = (torch.load(Path(workdir) / f"{v}.pt") for v in VARIANTS)
    diff = {k: float((ours[k].float() - base[k].float()).abs().max()) for k in base}
    truth = float64_values(args)
    error = {name: max(float((v[k][0, : len(t)].double() - t).abs().max()) for k, t in truth.items())
             for name, v in (("baseline", base), ("chunked", ours))}
    logits_mb = args.batch * args.tokens * args.vocab * torch.finfo(getattr(torch, args.dtype)).bits / 8 / 2**20
    print(f"logits {args.batch} x {args.tokens} x {args.vocab} {args.dtype}: {logits_mb:.0f} MiB; "
          f"forward + backward of log-probs and entropy, best of {args.repeats}")
    print(f"{'variant':<10} {'peak MiB':>9} {'seconds':>8}")
    for variant, f in figures.items():
        print(f"{variant:<10} {f['peak_bytes'] / 2**20:9.0f} {f['seconds']:8.3f}")
    result = {
        "peak_memory_ratio": round(figures["chunked"]["peak_bytes"] / figures["baseline"]["peak_bytes"], 3),
        "time_ratio": round(figures["chunked"]["seconds"] / figures["baseline"]["seconds"], 3),
        "max_abs_diff": max(diff["logp"], diff["entropy"]),
        "grad_max_abs_diff": diff["grad"],
        "baseline_error_vs_float64": error["baseline"],
        "chunked_error_vs_float64": error["chunked"],
        "baseline_peak_mib": round(figures["baseline"]["peak_bytes"] / 2**20),
        "chunked_peak_mib": round(figures["chunked"]["peak_bytes"] / 2**20),
    }
    print(f"chunked over baseline: memory {result['peak_memory_ratio']} (goal <= 0.25), time {result['time_ratio']} "
          f"(goal <= 1.0); largest difference of the log-probs and entropies {result['max_abs_diff']:.2e} "
          f"(goal as filed <= 1e-5), of the gradient {diff['grad']:.2e} (in {args.dtype}: a bfloat16 gradient of about 1 "
          "may round one step, 2^-8, apart)")
    print(f"against float64 on the first {TRUTH_TOKENS} positions: baseline {error['baseline']:.2e}, "
          f"chunked {error['chunked']:.2e} (within 1e-5: {error['chunked'] <= 1e-5})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
