"""The job's configuration: nested dataclasses, loaded from a preset or YAML file plus dotted overrides.

``load_config("tiny", ["--rollout.num_actors", "8"])`` is the only way a command (``segr1.run``,
``segr1 eval``, ``segr1 sft``) gets its settings. Each section is the settings object of the role
that takes it (``RolloutSettings``, ``RewardSettings``, ``LearnerSettings``, ...), defined, with its
defaults and range checks, beside that role; the sections here are the driver's own. ``validate``
holds the rules that span sections or only bind training, so an error always names the offending
key. Presets ship inside the package (``segr1/config/presets/*.yaml``) and only list what differs
from the defaults.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Literal

from actors.reward import RewardSettings
from actors.rollout import RolloutSettings, SamplingSettings
from learner.worker import LearnerSettings
from segr1.config.tools import (
    Alias,
    ConfigError,
    add_aliases,
    alias_overrides,
    from_dict,
    parse_overrides,
    read_yaml,
    to_dict,
)
from segr1.core.grpo import LossSettings
from segr1.core.merge import deep_merge
from segr1.core.policy import ModelSettings
from segr1.segmenters.settings import TINY_CHECKPOINT, Sam2Settings

PRESETS = ("tiny", "prerl", "cod", "sod")


@dataclass
class DataConfig:
    """Training and held-out data: a shard directory, or ``synthetic`` for generated COD images."""

    train: str = "synthetic"
    eval: str | None = None
    # The task every prompt is asked as; null asks each record as its own task (its `task` field).
    task: Literal["cod", "sod", "dis", "refer", "reason"] | None = None
    synthetic_count: int = 64
    synthetic_eval_count: int = 8
    image_size: int = 768
    shuffle: bool = True
    seed: int = 0


@dataclass(frozen=True)
class GRPOConfig(LossSettings):
    """The loss settings (clip, dual clip, KL coefficient and estimator, aggregation) and the
    advantage settings; the learner takes this object as its ``LossSettings``."""

    std_normalize: bool = True
    epsilon: float = 1e-6
    filter_zero_variance: bool = False
    # A control run's switch (benchmarks/learning.py): each group's advantages come from another
    # group's rewards, so they say nothing about its answers; logged rewards stay the true ones.
    shuffle_rewards: bool = False


@dataclass
class TrainerConfig:
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = 1
    steps: int = 1000
    prompts_per_step: int = 8
    epochs: int | None = None  # None: only ``steps`` bounds the run
    eval_every: int = 0
    checkpoint_every: int = 100
    sample_every: int = 50
    samples_to_save: int = 4
    output_dir: str = "runs/default"
    resume: bool = False
    seed: int = 0

    def steps_for(self, records: int) -> int:
        """The run's length: ``steps``, or fewer when ``epochs`` passes over ``records`` come first.

        An epoch is ``records / prompts_per_step`` steps; groups dropped by filtering are refilled
        from the following records, so with filtering on a run sees slightly more than ``epochs``."""
        if self.epochs is None:
            return self.steps
        return max(1, min(self.steps, self.epochs * records // self.prompts_per_step))


@dataclass
class RayConfig:
    """``address: null`` joins the cluster a ``ray job submit`` runs in, else starts a local one."""

    address: str | None = None
    num_cpus: float | None = None
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265


@dataclass(frozen=True)
class EvalSettings:
    """``segr1 eval``'s own settings (its other flags are aliases of the sections above): greedy
    answers by default, ``prompts_per_call`` prompts per engine call, and the square each image is
    resized to before the processor (``policy_size`` null: 768 for COD/SOD, 1024 for referring and
    reasoning, the paper's). ``seed`` seeds the engines, and sampling when ``temperature`` > 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 400
    seed: int = 0
    prompts_per_call: int = 8
    policy_size: int | None = None
    limit: int | None = None  # the first N examples of each benchmark
    reason_texts: Literal["first", "all"] = "first"  # ReasonSeg: each image's first query (LISA's) or all
    gallery: int = 8  # best and worst N per benchmark in the gallery (0: none)

    def __post_init__(self) -> None:
        for name in ("max_tokens", "prompts_per_call", "policy_size", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")

    def sampling(self) -> SamplingSettings:
        seed = self.seed if self.temperature > 0 else None
        return SamplingSettings(n=1, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                                seed=seed)


@dataclass(frozen=True)
class SftSettings:
    """``segr1 sft``'s own settings; the policy, data, learner and output come from ``model``,
    ``data.train``, ``learner`` and ``trainer.output_dir``. SFT has its own learning rate and
    warm-up (a supervised warm start takes a larger step than GRPO's 1e-6)."""

    steps: int = 100
    batch_size: int = 8  # records per optimizer step
    lr: float = 1e-5
    warmup_steps: int = 0
    random_coords: bool = False  # right format, coordinates unrelated to the object
    save_every: int = 0  # also checkpoint every N steps (0: only at the end)
    export: str | None = None  # the final policy's Hugging Face directory (null: OUTPUT/export)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.save_every < 0:
            raise ValueError("lr must be > 0, warmup_steps and save_every >= 0")


@dataclass(frozen=True)
class WandbSettings:
    """A Weights & Biases run per job (``monitor.wandb``): the config at start, then each step's
    scalars as TensorBoard gets them. ``mode: offline`` writes the run under ``dir`` only (sync it
    later with ``wandb sync``); online needs ``WANDB_API_KEY`` or ``wandb login``."""

    project: str = "segr1"
    entity: str | None = None
    name: str | None = None  # the run's name (null: W&B picks one)
    mode: Literal["online", "offline", "disabled"] = "online"
    dir: str | None = None  # where wandb keeps its files (null: the run's local folder, <run>/wandb)
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class MlflowSettings:
    """An MLflow run per job (``monitor.mlflow``): the config as parameters at start, then each
    step's scalars as metrics. ``tracking_uri`` null takes ``MLFLOW_TRACKING_URI``; a tracking
    server (``http://...``) works with the ``tracking`` extra (mlflow-skinny). A local
    ``file:`` store needs ``MLFLOW_ALLOW_FILE_STORE=true`` since MLflow 3.7 keeps it in
    maintenance mode; a ``sqlite:`` store needs the full ``mlflow`` package."""

    tracking_uri: str | None = None
    experiment: str = "segr1"
    run_name: str | None = None


@dataclass(frozen=True)
class ServeSettings:
    """``segr1 serve``'s own settings; the policy, SAM2 and how the policy answers come from
    ``model``, ``sam2``, ``rollout``, ``reward`` and ``evaluation``. Replicas and autoscaling are the
    Serve config's (``cluster/serve.yaml``). ``token_env`` names the variable holding the access
    token every ``/v1/segment`` request must bring (none set: no token asked); ``require_token``
    refuses to start without one (``segr1 serve`` sets it for a host beyond 127.0.0.1)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_image_pixels: int = 4096 * 4096
    max_upload_mb: int = 32
    max_batch_size: int = 8  # requests sharing one engine call
    batch_wait_timeout_s: float = 0.01
    token_env: str = "SEGR1_SERVE_TOKEN"
    require_token: bool = False

    def __post_init__(self) -> None:
        for name in ("port", "max_image_pixels", "max_upload_mb", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}")


@dataclass(frozen=True)
class MonitorSettings:
    """What the job shows and where its figures go (``segr1.train.monitor.Monitor`` takes it).

    ``verbose`` prints every process's output on the console (vLLM, DeepSpeed, Ray); otherwise
    the console holds segr1's progress bar, step lines and errors, and the rest is in
    ``<run>/logs/``. ``wandb`` and ``mlflow`` (null: off) track the run beyond TensorBoard."""

    verbose: bool = False
    wandb: WandbSettings | None = None
    mlflow: MlflowSettings | None = None


@dataclass
class Config:
    """Every section is the settings object of the role that takes it, passed on unchanged."""

    model: ModelSettings = field(default_factory=ModelSettings)
    sam2: Sam2Settings = field(default_factory=Sam2Settings)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    reward: RewardSettings = field(default_factory=RewardSettings)
    learner: LearnerSettings = field(default_factory=LearnerSettings)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    sft: SftSettings = field(default_factory=SftSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)


def preset_path(name: str) -> Path:
    return Path(str(resources.files("segr1.config") / "presets" / f"{name}.yaml"))


def load_config(
    source: str | None = "tiny", overrides: list[str] | None = None, aliased: dict | None = None
) -> Config:
    """A preset name or a YAML path (None: the defaults alone), then dotted overrides, then a
    command's aliases (``alias_overrides``); validated before it is returned."""
    data: dict = {}
    if source is not None:
        path = preset_path(source) if source in PRESETS else Path(source)
        if source not in PRESETS and not path.exists():
            raise ConfigError(f"config {source!r}: neither a preset {list(PRESETS)} nor an existing file")
        data = read_yaml(path)
    data = deep_merge(deep_merge(data, parse_overrides(overrides or [])), aliased or {})
    config = from_dict(Config, data)
    validate(config)
    return config


def config_dict(config: Config) -> dict:
    return to_dict(config)


def command_parser(
    prog: str, description: str, aliases: list[Alias], default_config: str | None = None
) -> argparse.ArgumentParser:
    """A command's parser: ``--config`` (``default_config``; None: the defaults of the settings
    classes), its short flags (``aliases``); any other ``--section.key VALUE`` is a dotted
    override, the same as the training job's."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, allow_abbrev=False,
        epilog="Any setting can be overridden with --section.key VALUE (e.g. --rollout.num_actors 2); "
        "each short flag names the key it sets. See docs/training.md.",
    )
    parser.add_argument("--config", default=default_config,
                        help=f"preset ({', '.join(PRESETS)}) or a YAML file (default: {default_config or 'none'})")
    add_aliases(parser, aliases)
    return parser


def parse_command(
    parser: argparse.ArgumentParser, aliases: list[Alias], argv: list[str] | None
) -> tuple[argparse.Namespace, Config]:
    """The command's own arguments and its validated config; raises ConfigError."""
    args, overrides = parser.parse_known_args(argv)
    return args, load_config(args.config, overrides, alias_overrides(args, aliases))


def resolve_model(model: ModelSettings) -> ModelSettings:
    """The policy as every node loads it: ``tiny`` or ``tiny-warm`` built (once, cached by content), a local
    directory made absolute (the previous stage's ``runs/cod/export`` names the same folder on
    every node), or a hub id as given."""
    if model.path in ("tiny", "tiny-warm"):
        from segr1.testing import tiny

        build = tiny.build_qwen if model.path == "tiny" else tiny.build_warm_qwen
        return replace(model, path=str(build(seed=model.seed)))
    path = Path(model.path).expanduser()
    if not path.exists():
        return model
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path {path}: not a Hugging Face model directory (no config.json)")
    return replace(model, path=str(path.resolve()))


# Why training samples at top-p 1 only (evaluation, with its own settings, samples any way).
NO_TOP_P = (
    "the learner's log-probs are of the whole distribution at the rollout's temperature, so under a "
    "nucleus the importance ratio and the KL would not describe what was sampled"
)


def validate(config: Config) -> None:
    """The rules that span sections or bind training only (each section checks its own ranges);
    raises ConfigError naming the key."""
    checks = [
        (config.rollout.group_size >= 2, "rollout.group_size must be >= 2 (GRPO compares within a group)"),
        (config.rollout.temperature > 0, f"rollout.temperature must be > 0 for GRPO training (it samples the "
         f"groups), got {config.rollout.temperature}"),
        (config.rollout.top_p == 1.0, f"rollout.top_p must be 1.0 for GRPO training, got {config.rollout.top_p}: "
         f"{NO_TOP_P}"),
        (
            config.learner.lr_schedule == "constant"
            or config.trainer.steps * config.learner.iterations_per_batch > config.learner.warmup_steps,
            "learner.lr_schedule 'cosine' needs more optimizer steps (trainer.steps x "
            "learner.iterations_per_batch) than learner.warmup_steps",
        ),
        (config.grpo.epsilon >= 0, "grpo.epsilon must be >= 0"),
        (config.trainer.steps >= 1, "trainer.steps must be >= 1"),
        (config.trainer.prompts_per_step >= 1, "trainer.prompts_per_step must be >= 1"),
        (config.trainer.max_staleness >= 0, "trainer.max_staleness must be >= 0"),
        (config.trainer.epochs is None or config.trainer.epochs >= 1, "trainer.epochs must be >= 1 or null"),
        (
            config.trainer.mode == "sync" or config.trainer.max_staleness >= 1,
            "trainer.max_staleness must be >= 1 in async mode (rollouts run one step ahead)",
        ),
        (config.data.image_size >= 28, "data.image_size must be >= 28 (one Qwen2.5-VL patch group)"),
    ]
    failed = [message for ok, message in checks if not ok]
    if failed:
        raise ConfigError("invalid config: " + "; ".join(failed))


def resolve_models(config: Config) -> Config:
    """``resolve_model`` for the policy, and the SAM2 checkpoint made absolute (``tiny`` as it is),
    both checked before Ray or any model starts."""
    sam2 = config.sam2
    if sam2.checkpoint != TINY_CHECKPOINT:
        checkpoint = Path(sam2.checkpoint).expanduser()
        if not checkpoint.is_file():
            raise ConfigError(f"sam2.checkpoint {checkpoint}: SAM2 checkpoint not found")
        sam2 = replace(sam2, checkpoint=str(checkpoint.resolve()))
    return replace(config, model=resolve_model(config.model), sam2=sam2)
