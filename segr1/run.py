"""``python -m segr1.run``: the GRPO training job (also what ``ray job submit`` runs).

With no arguments it runs the ``tiny`` preset: tiny random models built locally, synthetic
camouflage data, a local Ray cluster with its dashboard on 127.0.0.1. Everything else is the same
code a GPU cluster runs: ``python -m segr1.run --config cod --rollout.num_actors 8``.
"""

from __future__ import annotations

import logging
import sys

from segr1.config import Config, command_parser, parse_command
from segr1.config.tools import Alias, ConfigError
from segr1.runtime.deadlines import DeadlineExceeded
from segr1.runtime.storage import StorageError

ALIASES = [
    Alias("--resume", "trainer.resume", "continue from the latest checkpoint", const=True),
    Alias("--verbose", "monitor.verbose", "print the roles' output (vLLM, DeepSpeed, Ray) here too, not only in "
          "<output_dir>/logs", const=True),
]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = command_parser("python -m segr1.run", "Train a Qwen2.5-VL policy to prompt SAM2 with GRPO (Seg-R1) "
                            "on Ray.", ALIASES, default_config="tiny")
    try:
        _, config = parse_command(parser, ALIASES, argv)
    except ConfigError as exc:
        print(f"segr1.run: {exc}", file=sys.stderr)
        return 2
    try:
        train(config)
    except (StorageError, DeadlineExceeded) as exc:  # an output_dir the learner cannot see, a hung call
        print(f"segr1.run: {exc}", file=sys.stderr)
        return 1
    return 0


def train(config: Config) -> dict[str, float]:
    """Run the job described by ``config``; returns the last step's metrics."""
    from segr1.train.job import build_job

    job = build_job(config, config.trainer.output_dir)
    failed = True
    try:
        if config.trainer.resume:
            job.trainer.resume()
        last = job.trainer.fit()
        failed = False
        return last
    finally:
        job.shutdown(failed=failed)


if __name__ == "__main__":
    sys.exit(main())
