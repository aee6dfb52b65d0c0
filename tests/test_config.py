"""Config loading: presets, YAML files, dotted overrides, strict errors, round trip."""

from __future__ import annotations

import pytest

from segr1.config import PRESETS, Config, config_dict, load_config
from segr1.config.tools import ConfigError, from_dict, parse_overrides, read_yaml, write_yaml


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads_and_validates(preset):
    config = load_config(preset)
    assert config.rollout.group_size >= 2


def test_tiny_is_cpu_sized_and_paper_presets_keep_paper_settings():
    tiny = load_config("tiny")
    assert (tiny.model.path, tiny.sam2.checkpoint, tiny.data.train) == ("tiny-warm", "tiny", "synthetic")
    cod = load_config("cod")
    assert (cod.rollout.group_size, cod.rollout.temperature, cod.learner.lr) == (4, 1.0, 1e-6)
    assert (cod.grpo.kl_coef, cod.grpo.kl_estimator, cod.rollout.max_tokens) == (0.04, "k3", 400)
    assert load_config("prerl").rollout.max_tokens == 256


def test_overrides_in_all_three_spellings_with_yaml_typed_values():
    config = load_config(
        "tiny", ["--rollout.num_actors", "8", "--grpo.dual_clip=3", "trainer.mode=async", "--ray.address", "auto"]
    )
    assert config.rollout.num_actors == 8
    assert config.grpo.dual_clip == 3.0
    assert config.trainer.mode == "async"
    assert config.ray.address == "auto"
    assert load_config("tiny", ["--learner.lr", "1e-3"]).learner.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--rollout.num_actor", "8"], r"rollout: unknown key\(s\) \['num_actor'\]"),
        (["--rollout.num_actors", "many"], r"rollout.num_actors: expected int, got 'many'; or 'many' is not one of \['auto'\]"),
        (["--rollout.num_actors", "auto", "--rollout.min_actors", "3", "--rollout.max_actors", "2"],
         "rollout.min_actors must be >= 1 and <= max_actors, got 3 and 2"),
        (["--trainer.mode", "eager"], "trainer.mode: 'eager' is not one of"),
        (["--rollout.group_size", "1"], "rollout.group_size must be >= 2"),
        (["--trainer.mode", "async", "--trainer.max_staleness", "0"], "max_staleness must be >= 1 in async"),
        (["--rollout.num_actors"], "expected --section.key VALUE"),
        (["--learner.zero_stage", "4"], "learner.zero_stage: 4 is not one of"),
        (["--grpo.dual_clip", "0.5"], "dual_clip must be > 1"),
        (["--grpo.kl_estimator", "k9"], "kl_estimator must be one of"),
        (["--reward.weights.iou", "-1"], "reward.weights: RewardWeights.iou must be"),
        (["--trainer.epochs", "0"], "trainer.epochs must be >= 1 or null"),
        (["--learner.lr_schedule", "linear"], "learner.lr_schedule: 'linear' is not one of"),
        (["--learner.min_lr_ratio", "2"], r"learner.min_lr_ratio must be in \[0, 1\]"),
        (["--learner.lr_schedule", "cosine", "--learner.warmup_steps", "4", "--trainer.steps", "4"],
         "'cosine' needs more optimizer steps"),
        # the learner computes the log-probs at any temperature, but not under a nucleus
        (["--rollout.temperature", "0"], r"rollout.temperature must be > 0 for GRPO training .*got 0.0"),
        (["--rollout.top_p", "0.9"], r"rollout.top_p must be 1.0 for GRPO training, got 0.9: .*importance ratio and the KL"),
    ],
)
def test_bad_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_epochs_bound_the_run_length():
    trainer = load_config("cod").trainer  # 2 epochs, 16 prompts per step, steps 100000
    assert trainer.steps_for(8000) == 1000
    assert trainer.steps_for(10**9) == trainer.steps  # steps bound first
    assert trainer.steps_for(3) == 1  # never zero steps
    assert load_config("tiny", ["--trainer.steps", "7"]).trainer.steps_for(10) == 7  # no epochs: steps only


def test_unknown_source_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config("cod", ["--rollout.num_actors", "3"])
    path = tmp_path / "resolved.yaml"
    write_yaml(config_dict(config), path)
    assert from_dict(Config, read_yaml(path)) == config
    assert not list(tmp_path.glob("*.tmp"))
    assert load_config(str(path)) == config


def test_parse_overrides_nests_keys():
    assert parse_overrides(["a.b.c=1", "--a.d", "x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_each_section_is_the_settings_object_its_role_takes():
    """The job hands these objects to the roles as they are: a field added to a role's settings
    is a config key at once, with one default (no copy that can drift)."""
    from actors.reward import RewardSettings
    from actors.rollout import RolloutSettings
    from learner.worker import LearnerSettings
    from segr1.core.policy import ModelSettings
    from segr1.segmenters.settings import Sam2Settings

    config = Config()
    sections = (config.model, config.sam2, config.rollout, config.reward, config.learner)
    assert [type(s) for s in sections] == [ModelSettings, Sam2Settings, RolloutSettings, RewardSettings,
                                           LearnerSettings]
    # The defaults that had drifted apart, now one each.
    assert config.rollout.kv_cache_memory_bytes == 1 << 30 and load_config("tiny").rollout.kv_cache_memory_bytes == 128 << 20
    assert config.reward.decode_chunk == 0  # the device's default (8 on CPU, 64 on a GPU)
    assert config.sam2.box_point_radius == 4.0 and load_config("tiny", ["--sam2.box_point_radius", "1.5"]).sam2.box_point_radius == 1.5
    assert load_config("tiny", ["--reward.num_gpus_per_actor", "0"]).reward.num_gpus_per_actor == 0  # SAM2 on CPU
    with pytest.raises(ConfigError, match=r"reward.num_gpus_per_actor must be in \[0, 8\], got 9"):
        load_config("tiny", ["--reward.num_gpus_per_actor", "9"])
    with pytest.raises(ConfigError, match="sam2.image_size must be a positive multiple of 32, got 48"):
        load_config("tiny", ["--sam2.image_size", "48"])


def test_eval_and_sft_flags_are_aliases_of_config_keys(tmp_path):
    """``segr1 eval`` and ``segr1 sft`` read the job's presets, YAML and dotted overrides; a short
    flag sets its key, after the overrides."""
    from segr1.config import command_parser, parse_command
    from segr1.eval import ALIASES as EVAL
    from segr1.eval import build_parser
    from segr1.train.sft import ALIASES as SFT

    args, config = parse_command(build_parser(), EVAL, [
        "--config", "cod", "--policy", "2024", "--kv-cache-mb", "64", "--no-bf16", "--rollout-actors", "3",
        "--rollout.max_model_len", "2048", "--benchmark", "x:y", "--out", str(tmp_path), "--temperature", "0.5",
    ])
    assert config.model.path == "2024"  # a path stays a string
    assert (config.rollout.kv_cache_memory_bytes, config.reward.bf16) == (64 << 20, False)
    assert (config.rollout.num_actors, config.rollout.max_model_len) == (3, 2048)
    assert config.learner.zero_stage == 3 and config.data.task == "cod"  # the rest of the cod preset
    assert config.evaluation.sampling().temperature == 0.5 and args.benchmark == ["x:y"]
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model:\n  max_pixels: 12544\nsft:\n  steps: 7\n")
    _, sft = parse_command(command_parser("sft", "", SFT), SFT, [
        "--config", str(yaml_file), "--data", "shards", "--lr", "3e-5", "--random-coords", "--learner.zero_stage", "0",
    ])
    assert (sft.sft.steps, sft.sft.lr, sft.sft.random_coords, sft.model.max_pixels) == (7, 3e-5, True, 12544)
    assert (sft.data.train, sft.learner.zero_stage) == ("shards", 0)
    with pytest.raises(ConfigError, match="evaluation.max_tokens must be >= 1, got 0"):
        parse_command(build_parser(), EVAL, ["--max-tokens", "0", "--benchmark", "x:y", "--out", "o"])
