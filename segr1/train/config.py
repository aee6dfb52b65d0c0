"""The job's configuration: nested dataclasses, loaded from a preset or YAML file plus dotted overrides.

``load_config("tiny", ["--rollout.num_actors", "8"])`` is the only way a job gets its settings, and
``validate`` is the only place that judges them, so an error always names the offending key.
Presets ship inside the package (``segr1/train/presets/*.yaml``) and only list what differs from the
defaults below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from segr1.core.grpo import LossSettings
from segr1.core.parser import ParserLimits
from segr1.core.rewards import RewardWeights
from segr1.train.configtools import ConfigError, from_dict, merge, parse_overrides, read_yaml, to_dict

PRESETS = ("tiny", "prerl", "cod", "sod")


@dataclass
class ModelConfig:
    """The policy. ``path: tiny`` builds the tiny random Qwen2.5-VL from ``segr1.testing.tiny``."""

    path: str = "tiny"
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    min_pixels: int = 3136
    max_pixels: int = 768 * 768
    seed: int = 0


@dataclass
class Sam2Config:
    """The segmenter behind the reward. ``checkpoint: tiny`` builds a random-weight SAM2 for tests."""

    backend: Literal["sam2", "box"] = "sam2"
    config: str = "configs/sam2.1/sam2.1_hiera_l.yaml"
    checkpoint: str = "checkpoints/sam2.1_hiera_large.pt"
    image_size: int | None = None
    box_point_radius: int = 4


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


@dataclass
class RolloutConfig:
    num_actors: int = 1
    num_gpus_per_actor: int = 1  # also the tensor-parallel size
    num_cpus_per_actor: float = 1.0
    group_size: int = 4
    temperature: float = 1.0  # training samples at 1.0 only, see RAW_LOGPROBS
    top_p: float = 1.0  # likewise 1.0 only
    max_tokens: int = 400
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.6
    kv_cache_memory_bytes: int = 128 << 20  # CPU only: vLLM would otherwise reserve ~90% of RAM
    enforce_eager: bool = False
    max_restarts: int = 3
    max_in_flight_per_actor: int = 2


@dataclass
class RewardConfig:
    num_actors: int = 1
    num_gpus_per_actor: float = 1.0
    num_cpus_per_actor: float = 1.0
    bf16: bool = True
    decode_chunk: int = 8
    decode_pad_to: int = 0  # > 0: pad SAM2 prompts to this many tokens, one decode batch per group
    weights: RewardWeights = field(default_factory=RewardWeights)
    limits: ParserLimits = field(default_factory=ParserLimits)
    max_restarts: int = 3
    max_in_flight_per_actor: int = 4


@dataclass
class LearnerConfig:
    num_workers: int = 1
    num_gpus_per_worker: int = 1
    num_cpus_per_worker: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 2
    deepspeed_config: str | None = None
    lr: float = 1e-6
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine decays over the run's steps
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 4
    iterations_per_batch: int = 1
    gradient_checkpointing: bool = True
    freeze_vision: bool = False
    sync_bucket_mb: int = 256


@dataclass(frozen=True)
class GRPOConfig(LossSettings):
    """The loss settings (clip, dual clip, KL coefficient and estimator, aggregation) and the
    advantage settings; the learner takes this object as its ``LossSettings``."""

    std_normalize: bool = True
    epsilon: float = 1e-6
    filter_zero_variance: bool = False


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


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sam2: Sam2Config = field(default_factory=Sam2Config)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def preset_path(name: str) -> Path:
    return Path(str(resources.files("segr1.train") / "presets" / f"{name}.yaml"))


def load_config(source: str = "tiny", overrides: list[str] | None = None) -> Config:
    """A preset name or a YAML path, then overrides; validated before it is returned."""
    path = preset_path(source) if source in PRESETS else Path(source)
    if source not in PRESETS and not path.exists():
        raise ConfigError(f"config {source!r}: neither a preset {list(PRESETS)} nor an existing file")
    data = merge(read_yaml(path), parse_overrides(overrides or []))
    config = from_dict(Config, data)
    validate(config)
    return config


def config_dict(config: Config) -> dict:
    return to_dict(config)


# Why training samples at temperature 1 and top-p 1 only (evaluation, with its own settings, samples any way).
RAW_LOGPROBS = (
    "vLLM returns the raw log-probs of the unscaled full distribution, so under other sampling the "
    "importance ratio and the KL would not describe what was sampled"
)


def validate(config: Config) -> None:
    """Every cross-field rule in one place; raises ConfigError naming the key."""
    checks = [
        (config.rollout.num_actors >= 1, "rollout.num_actors must be >= 1"),
        (config.rollout.group_size >= 2, "rollout.group_size must be >= 2 (GRPO compares within a group)"),
        (config.rollout.max_tokens >= 1, "rollout.max_tokens must be >= 1"),
        (config.rollout.temperature == 1.0, f"rollout.temperature must be 1.0 for GRPO training, got "
         f"{config.rollout.temperature}: {RAW_LOGPROBS}"),
        (config.rollout.top_p == 1.0, f"rollout.top_p must be 1.0 for GRPO training, got {config.rollout.top_p}: "
         f"{RAW_LOGPROBS}"),
        (config.reward.num_actors >= 1, "reward.num_actors must be >= 1"),
        (0 < config.reward.num_gpus_per_actor <= 8, "reward.num_gpus_per_actor must be in (0, 8]"),
        (config.learner.num_workers >= 1, "learner.num_workers must be >= 1"),
        (config.learner.lr > 0, "learner.lr must be > 0"),
        (0 <= config.learner.min_lr_ratio <= 1, "learner.min_lr_ratio must be in [0, 1]"),
        (
            config.learner.lr_schedule == "constant"
            or config.trainer.steps * config.learner.iterations_per_batch > config.learner.warmup_steps,
            "learner.lr_schedule 'cosine' needs more optimizer steps (trainer.steps x "
            "learner.iterations_per_batch) than learner.warmup_steps",
        ),
        (config.learner.micro_batch_size >= 1, "learner.micro_batch_size must be >= 1"),
        (config.learner.iterations_per_batch >= 1, "learner.iterations_per_batch must be >= 1"),
        (config.learner.sync_bucket_mb >= 1, "learner.sync_bucket_mb must be >= 1"),
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
        (config.sam2.image_size is None or config.sam2.image_size % 16 == 0, "sam2.image_size must be a multiple of 16"),
    ]
    failed = [message for ok, message in checks if not ok]
    if failed:
        raise ConfigError("invalid config: " + "; ".join(failed))
