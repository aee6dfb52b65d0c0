"""The ``segr1`` console script: one subcommand per entry module, each also ``python -m segr1.<name>``."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "run": ("segr1.run", "train: the Ray actor-learner GRPO job (default preset: tiny)"),
    "eval": ("segr1.eval", "evaluate a policy checkpoint on COD/SOD, referring and reasoning benchmarks"),
    "sft": ("segr1.sft", "supervised warm start that teaches the output format"),
    "serve": ("segr1.serve", "serve a policy and SAM2 over HTTP on Ray Serve: a web page and POST /v1/segment"),
    "predict": ("segr1.predict", "batch prediction on Ray Data: masks for a folder of images or a dataset"),
    "data": ("segr1.data", "prepare Parquet shards from dataset folders, or synthesise a dataset"),
    "tiny": ("segr1.tiny", "build the tiny random Qwen2.5-VL and SAM2 used by tests and the demo"),
}


def usage() -> str:
    lines = ["usage: segr1 <command> [args...]", "", "commands:"]
    lines += [f"  {name:<7} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Each command takes --help."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"segr1: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
