"""The DeepSpeed learner: input building, the rank plan, checkpoints, and real GRPO steps on CPU.

The slow tests run real DeepSpeed engines in two Ray actors over gloo (ZeRO-2 and ZeRO-3) on the
tiny Qwen2.5-VL in float32, and check numbers a user would: log-probs of positive-advantage
samples rise, of negative ones fall; the KL against an identical reference is exactly 0; the
reported loss and gradient norm equal a single-process computation over the whole batch; a
frozen vision tower stays bit-identical; a resumed run's next step is bit-identical to an
uninterrupted one; the weights broadcast to a receiver equal the exported ones; the exported
directory loads in vLLM and its sampled-token log-probs equal the learner's.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from learner import checkpoint as ckpt
from learner.inputs import PromptCache, Sampled, collate, completion_logits, plan_micro_batches, process_prompt
from learner.worker import LearnerRun, LearnerSettings, deepspeed_config, lr_factor
from segr1.core.grpo import LossSettings, grpo_loss
from segr1.core.policy import ModelSettings
from segr1.core.prompts import build_messages, render_prompt
from segr1.core.schema import TrainSample, prompt_digest
from segr1.runtime.storage import Storage

TEXT_VOCAB = 1024  # the tiny tokenizer's BPE ids; special and vision tokens come after


def _sample(group: str, n: int, advantage: float = 0.0, image=None, prompt: str = "p<|image_pad|>") -> TrainSample:
    return TrainSample(group, prompt, image, list(range(5, 5 + n)), [0.0] * n, advantage, 0)


# ----------------------------------------------------------------------------------------------
# Pure parts: the plan over ranks and micro-batches


def test_plan_gives_every_rank_the_same_passes_and_shares_sum_to_one():
    lengths = [9, 1, 4, 4, 7, 2, 3]
    samples = [_sample(f"g{i // 3}", n) for i, n in enumerate(lengths)]
    plans = plan_micro_batches(samples, num_ranks=2, micro_batch_size=2)
    assert len(plans[0]) == len(plans[1])  # lockstep passes (ZeRO-3 gathers are collective)
    real = [m for plan in plans for m in plan if not m.is_filler]
    assert sorted(i for m in real for i in m.indices) == list(range(len(lengths)))
    assert math.isclose(sum(m.share for m in real), 1.0)
    for m in real:  # token_mean share = the micro-batch's completion tokens / all tokens
        assert math.isclose(m.share, sum(lengths[i] for i in m.indices) / sum(lengths))
    loads = [sum(len(s.completion_ids) for m in plan for s in m.samples if not m.is_filler) for plan in plans]
    assert abs(loads[0] - loads[1]) <= max(lengths)


def test_plan_pads_idle_ranks_with_fillers_and_seq_mean_counts_sequences():
    samples = [_sample("g", 3), _sample("g", 0)]
    plans = plan_micro_batches(samples, num_ranks=3, micro_batch_size=4, aggregation="seq_mean")
    assert [len(p) for p in plans] == [1, 1, 1]
    fillers = [m for p in plans for m in p if m.is_filler]
    assert len(fillers) == 1 and fillers[0].share == 0.0
    # seq_mean: the empty completion counts for nothing, the other for the whole batch
    shares = {tuple(m.indices): m.share for p in plans for m in p if not m.is_filler}
    assert shares == {(0,): 1.0, (1,): 0.0}


def test_plan_rejects_bad_batches():
    with pytest.raises(ValueError, match="empty"):
        plan_micro_batches([], 2, 2)
    bad = TrainSample("g7", "p", None, [1, 2, 3], [0.0], 1.0, 0)
    with pytest.raises(ValueError, match="group g7: 3 completion tokens but 1 behavior"):
        plan_micro_batches([bad], 1, 1)
    with pytest.raises(ValueError, match="aggregation"):
        plan_micro_batches([_sample("g", 2)], 1, 1, aggregation="sum")


MODEL = ModelSettings(path="m")


def test_settings_and_deepspeed_config(tmp_path):
    with pytest.raises(ValueError, match="zero_stage"):
        LearnerSettings(zero_stage=4)
    with pytest.raises(TypeError, match="loss must be a segr1.core.grpo.LossSettings"):
        LearnerRun(MODEL, loss={"kl_coef": 0.04}).check(LearnerSettings())
    with pytest.raises(ValueError, match="deepspeed_config .* is not a file"):
        LearnerSettings(deepspeed_config=str(tmp_path / "missing.json"))
    override = tmp_path / "ds.json"
    override.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 0.5}))
    settings = LearnerSettings(zero_stage=3, micro_batch_size=2, deepspeed_config=str(override))
    config = deepspeed_config(settings, world_size=4, bf16=True)
    assert config["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000}
    assert config["gradient_clipping"] == 0.5 and config["train_batch_size"] == 8
    assert config["bf16"] == {"enabled": True}
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="list.json: must hold a JSON object"):
        deepspeed_config(LearnerSettings(deepspeed_config=str(tmp_path / "list.json")), 1, False)


def test_lr_schedule_warms_up_then_holds_or_follows_a_cosine_to_its_floor():
    constant = LearnerSettings(warmup_steps=4)
    assert [lr_factor(step, constant, None) for step in (0, 1, 3, 4, 10_000)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cosine = LearnerSettings(warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(step, cosine, 12) for step in range(20)]
    assert factors[:2] == [0.5, 1.0]
    assert all(a > b for a, b in zip(factors[1:11], factors[2:12]))  # strictly down to the last step
    # Half-way through the decay (step 6 of 2..11) the cosine is at the mid-point of [floor, 1].
    assert factors[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert factors[11:] == [pytest.approx(0.1)] * 9  # holds the floor past decay_steps, never turns up
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        LearnerSettings(lr_schedule="linear")
    with pytest.raises(ValueError, match="min_lr_ratio must be in"):
        LearnerSettings(lr_schedule="cosine", min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="needs decay_steps > warmup_steps"):
        LearnerRun(MODEL, decay_steps=5).check(LearnerSettings(lr_schedule="cosine", warmup_steps=5))


# ----------------------------------------------------------------------------------------------
# Checkpoint files


def test_checkpoint_publish_latest_and_replace(tmp_path):
    root = Storage(tmp_path)

    def fake_step(name: str, marker: str) -> None:
        tmp = tmp_path / ckpt.tmp_name(name)
        (tmp / ckpt.DEEPSPEED_TAG).mkdir(parents=True)
        (tmp / ckpt.DEEPSPEED_TAG / "marker").write_text(marker)

    assert ckpt.latest(root) is None  # nothing yet: a run submitted with --resume starts at 0
    fake_step("step_1", "a")
    assert ckpt.publish(root, "step_1", {"step": "a"}) == str(tmp_path / "step_1")
    fake_step("step_2", "b")
    ckpt.publish(root, "step_2", {"step": "b"})
    assert (tmp_path / ckpt.LATEST).read_text().strip() == "step_2"
    assert ckpt.latest(root) == "step_2"
    fake_step("step_1", "c")
    ckpt.publish(root, "step_1", {"step": "c"})  # saving a step again replaces it
    assert ckpt.read_client_state(root, "step_1") == {"step": "c"}
    assert (tmp_path / "step_1" / ckpt.DEEPSPEED_TAG / "marker").read_text() == "c"
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.LATEST, "step_1", "step_2"]
    (tmp_path / ckpt.LATEST).write_text("../elsewhere")
    with pytest.raises(ckpt.CheckpointError, match="does not name a step directory"):
        ckpt.latest(root)
    (tmp_path / ckpt.LATEST).write_text("step_9")
    with pytest.raises(ckpt.CheckpointError, match="step_9: not a complete segr1 checkpoint"):
        ckpt.latest(root)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        ckpt.client_state_text({"bad": object()})


def test_each_rank_downloads_only_its_own_shards():
    files = ["client_state.json", "rng_rank0.json", "rng_rank1.json", "deepspeed/mp_rank_00_model_states.pt",
             "deepspeed/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "deepspeed/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
             "deepspeed/zero_pp_rank_11_mp_rank_00_model_states.pt"]
    assert [f for f in files if ckpt.rank_needs(f, 1)] == [
        "client_state.json", "rng_rank1.json", "deepspeed/mp_rank_00_model_states.pt",
        "deepspeed/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]


def test_rng_state_round_trips_through_json(tmp_path):
    import random

    ckpt.save_rng(tmp_path, rank=1)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    ckpt.load_rng(tmp_path, rank=1)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


# ----------------------------------------------------------------------------------------------
# Inputs on the real tiny model (transformers only)


@pytest.fixture(scope="module")
def tiny_processor(tiny_qwen_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_qwen_dir)


def _batch_samples(processor, rng: np.random.Generator, images, lengths, advantages) -> list[TrainSample]:
    """Two groups (one per image) with the given completion lengths and advantages."""
    prompts = [render_prompt(processor, build_messages("cod")), render_prompt(processor, build_messages("sod"))]
    per_group = len(lengths) // len(images)
    samples = []
    for i, (n, adv) in enumerate(zip(lengths, advantages)):
        g = i // per_group
        ids = rng.integers(0, TEXT_VOCAB, n).tolist()
        samples.append(TrainSample(f"group-{g}", prompts[g], images[g], ids, [0.0] * n, adv, 0))
    return samples


def test_padded_batch_log_probs_equal_one_sample_forwards(tiny_qwen_dir, tiny_processor):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), rng.integers(0, 256, (140, 84, 3), dtype=np.uint8)]
    samples = _batch_samples(tiny_processor, rng, images, [5, 1, 8, 3, 6, 2], [1.0] * 6)
    cache = PromptCache(tiny_processor)
    prompts = [cache.get(s) for s in samples]
    assert cache.misses == 2  # one processing per group, shared by its samples
    batch = collate(samples, prompts, tiny_processor.tokenizer.pad_token_id)
    with torch.no_grad():
        batched = Sampled().logprobs(completion_logits(model, batch), batch.completion_ids)  # nothing banned
        for row, (sample, prompt) in enumerate(zip(samples, prompts)):
            ids = torch.cat([prompt.input_ids, torch.tensor(sample.completion_ids)])[None]
            types = torch.cat([prompt.mm_token_type_ids, torch.zeros(len(sample.completion_ids), dtype=torch.long)])
            logits = model(
                input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types[None],
                pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
            ).logits[0, len(prompt.input_ids) - 1 : -1]
            alone = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt.input_ids) :, None])[:, 0]
            n = len(sample.completion_ids)
            assert torch.allclose(batched[row, :n], alone, atol=1e-5), row
            assert batch.completion_mask[row].sum() == n


def test_prompt_cache_names_the_group_of_a_bad_image(tiny_processor):
    cache = PromptCache(tiny_processor)
    bad = TrainSample("group-x", "p <|image_pad|>", np.zeros((8, 8, 3), np.float32), [1], [0.0], 0.0, 0)
    with pytest.raises(ValueError, match="group group-x: image must be a uint8 HxWx3 RGB array"):
        cache.get(bad)
    two = TrainSample("group-y", "<|image_pad|><|image_pad|>", np.zeros((56, 56, 3), np.uint8), [1], [0.0], 0.0, 0)
    with pytest.raises(ValueError, match="group group-y: prompt must hold exactly one"):
        cache.get(two)


def test_prompt_cache_refuses_a_sample_whose_engine_prompt_differs(tiny_processor):
    prompt = render_prompt(tiny_processor, build_messages("cod"))
    image = np.random.default_rng(2).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    ids = process_prompt(tiny_processor, prompt, image, "g").input_ids.tolist()

    def sample(group: str, length: int | None, digest: str | None) -> TrainSample:
        return replace(_sample(group, 3, image=image, prompt=prompt), prompt_length=length, prompt_sha256=digest)

    cache = PromptCache(tiny_processor)
    cache.get(sample("same", len(ids), prompt_digest(ids)))
    cache.get(sample("sft", None, None))  # no engine tokens (an SFT sample): nothing to check
    with pytest.raises(ValueError, match=rf"group longer: the rollout engine's prompt has {len(ids) + 1} tokens"):
        cache.get(sample("longer", len(ids) + 1, prompt_digest(ids)))
    other = ids[:3] + [ids[3] + 1] + ids[4:]  # same length, one token differs
    with pytest.raises(ValueError, match=rf"group other: .* but the learner's has {len(ids)} .*min_pixels/max_pixels"):
        cache.get(sample("other", len(ids), prompt_digest(other)))
    # a cached prompt is checked again for every sample of its group
    with pytest.raises(ValueError, match="group same: the rollout engine's prompt"):
        cache.get(sample("same", len(ids), prompt_digest(other)))


# ----------------------------------------------------------------------------------------------
# Real DeepSpeed ranks in Ray actors


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


LENGTHS = [6, 3, 9, 4, 7, 2]  # two groups of three; one rank gets more tokens than the other
ADVANTAGES = [1.2, -0.4, -0.8, -1.0, 0.3, 0.7]


@pytest.fixture(scope="module")
def grpo_batch(tiny_processor, ray_local):
    """Samples whose images are ObjectRefs, as the driver sends them."""
    rng = np.random.default_rng(1)
    images = [ray_local.put(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(2)]
    return _batch_samples(tiny_processor, rng, images, LENGTHS, ADVANTAGES)


def _with_behavior(samples: list[TrainSample], logprobs: list[list[float]]) -> list[TrainSample]:
    return [
        TrainSample(s.group_id, s.prompt, s.image, s.completion_ids, lp, s.advantage, s.weight_version)
        for s, lp in zip(samples, logprobs)
    ]


def _settings(zero_stage: int, freeze_vision: bool = False) -> LearnerSettings:
    return LearnerSettings(
        num_workers=2, num_cpus_per_worker=1, zero_stage=zero_stage, lr=2e-3, warmup_steps=1, lr_schedule="cosine",
        min_lr_ratio=0.1, grad_clip=1.0, micro_batch_size=2, gradient_checkpointing=True, freeze_vision=freeze_vision,
    )


def _run(model: Path, loss: LossSettings = LossSettings(kl_coef=0.04)) -> LearnerRun:
    return LearnerRun(ModelSettings(path=str(model), dtype="float32", min_pixels=None, max_pixels=None), loss,
                      seed=0, decay_steps=4)


def _reference_grad_norm(
    model_dir: Path, processor, samples: list[TrainSample], group: Any
) -> tuple[float, float]:
    """Loss and gradient norm of the whole batch in one process, without DeepSpeed."""
    import ray
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model.model.visual.requires_grad_(not group.settings.freeze_vision)
    local = [TrainSample(s.group_id, s.prompt, ray.get(s.image), s.completion_ids, s.behavior_logprobs,
                         s.advantage, 0) for s in samples]
    cache = PromptCache(processor)
    batch = collate(local, [cache.get(s) for s in local], processor.tokenizer.pad_token_id)
    logp = Sampled.of(processor, model.config).logprobs(completion_logits(model, batch), batch.completion_ids)
    loss, _ = grpo_loss(
        logp, batch.behavior_logprobs, logp.detach(), batch.advantages, batch.completion_mask, group.run.loss
    )
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return float(loss.detach()), float(norm)


def _real_tokens(processor, samples: list[TrainSample]) -> int:
    """Prompt plus completion tokens of the samples, the prompts as the learner's processor builds them."""
    cache = PromptCache(processor)
    return sum(len(cache.get(s).input_ids) + len(s.completion_ids) for s in samples)


def _check_grpo_step(group, samples, tiny_qwen_dir, tiny_processor) -> list[TrainSample]:
    """One step: direction, exact KL 0, loss and grad norm of the whole batch. Returns the batch."""
    before = group.compute_logprobs(samples)
    assert [len(lp) for lp in before] == LENGTHS
    batch = _with_behavior(samples, before)
    loss_ref, norm_ref = _reference_grad_norm(tiny_qwen_dir, tiny_processor, batch, group)
    digest, vision = group.weights_digest(), group.weights_digest("model.visual.")
    metrics = group.train_step(batch)
    assert group.weights_digest() != digest
    assert (group.weights_digest("model.visual.") == vision) == group.settings.freeze_vision
    # On-policy against an identical reference: ratio 1, nothing clipped, KL exactly 0.
    assert metrics["kl"] == 0.0
    assert metrics["clip_frac"] == 0.0 and abs(metrics["ratio_mean"] - 1.0) < 1e-6
    # The ranks' share-weighted pieces add up to the loss of the whole batch, and so does the gradient.
    expected = -sum(a * n for a, n in zip(ADVANTAGES, LENGTHS)) / sum(LENGTHS)
    assert metrics["loss"] == pytest.approx(expected, abs=1e-5) and loss_ref == pytest.approx(expected, abs=1e-5)
    assert metrics["grad_norm"] == pytest.approx(norm_ref, rel=1e-4)
    assert metrics["tokens"] == _real_tokens(tiny_processor, batch) and metrics["tokens_per_s"] > 0
    assert metrics["entropy"] > 0
    after = group.compute_logprobs(samples)
    for adv, lp0, lp1 in zip(ADVANTAGES, before, after):
        change = float(np.mean(lp1) - np.mean(lp0))
        assert change > 1e-3 if adv > 0 else change < -1e-3, (adv, change)
    return _with_behavior(samples, after)


@pytest.mark.slow
def test_zero2_grpo_step_moves_log_probs_and_resumes_exactly(
    ray_local, tiny_qwen_dir, tiny_processor, grpo_batch, tmp_path
):
    from learner.group import LearnerGroup

    group = LearnerGroup(_settings(2, freeze_vision=True), _run(tiny_qwen_dir), name_prefix="test-zero2")
    try:
        next_batch = _check_grpo_step(group, grpo_batch, tiny_qwen_dir, tiny_processor)
        path = group.save_checkpoint(tmp_path, {"step": 1, "data": {"position": 6}})
        assert path == str(tmp_path / "step_1") and (tmp_path / "latest").read_text().strip() == "step_1"
        uninterrupted = group.train_step(next_batch)
        digest = group.weights_digest()
        state = group.load_checkpoint(tmp_path)  # back to step 1 in the same ranks: optimizer too
        assert state == {"step": 1, "data": {"position": 6}, "weight_version": 0}
        resumed = group.train_step(next_batch)
        assert group.weights_digest() == digest
        assert resumed["loss"] == uninterrupted["loss"] and resumed["lr"] == uninterrupted["lr"]
        # The second optimizer step is past warm-up, on the cosine, in both runs: the schedule's
        # position came back with the checkpoint.
        factor = lr_factor(1, group.settings, group.run.decay_steps)
        assert resumed["lr"] == pytest.approx(2e-3 * factor) and factor < 1
        # The push sends DeepSpeed's flat buffer of the trained matrices as it lies: the weights arrive
        # bit for bit, and none of those matrices is copied first (the frozen vision tower and the
        # small vectors may be).
        received, sent, plan = _push_to_this_process(group, 1)
        assert _digest(received) == digest
        weights = sum(slot.nbytes for bucket in plan.buckets for slot in bucket.slots)
        trained_matrices = sum(t.numel() * t.element_size() for name, t in received.items()
                               if t.dim() >= 2 and "visual" not in name)
        assert 0 < trained_matrices and sent["staged"] <= weights - trained_matrices, sent
    finally:
        group.shutdown()


def _digest(named: dict[str, torch.Tensor]) -> str:
    """``weights_digest`` of tensors in hand: SHA-256 over the names and bytes, in order."""
    import hashlib

    sha = hashlib.sha256()
    for name, tensor in named.items():
        sha.update(name.encode())
        sha.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


@pytest.mark.slow
def test_tokens_leave_out_the_filler_of_a_rank_with_less_work(ray_local, tiny_qwen_dir, tiny_processor, grpo_batch):
    from learner.group import LearnerGroup

    samples = [grpo_batch[2], grpo_batch[1], grpo_batch[5]]  # 9, 3 and 2 completion tokens
    settings = replace(_settings(2), micro_batch_size=1)
    # one rank runs the 9-token sample, the other the 3 and the 2: the first adds a filler pass
    assert sum(m.is_filler for plan in plan_micro_batches(samples, 2, 1) for m in plan) == 1
    group = LearnerGroup(settings, _run(tiny_qwen_dir, LossSettings()), name_prefix="test-fillers")
    try:
        metrics = group.train_step(samples)
    finally:
        group.shutdown()
    assert metrics["tokens"] == _real_tokens(tiny_processor, samples)
    assert metrics["completion_tokens"] == 9 + 3 + 2


@pytest.mark.slow
def test_deadline_a_hung_learner_step_stops_naming_the_rank_and_the_call(
    ray_local, tiny_qwen_dir, grpo_batch, tmp_path, monkeypatch
):
    from learner.group import LearnerGroup
    from segr1.runtime.deadlines import HANG_DIR_ENV, DeadlineExceeded

    monkeypatch.setenv(HANG_DIR_ENV, str(tmp_path))  # the tests' fault switch, carried by the new ranks
    settings = replace(_settings(2), num_workers=1, step_deadline_s=3.0, step_deadline_per_sample_s=0.5)
    group = LearnerGroup(settings, _run(tiny_qwen_dir, LossSettings()), name_prefix="test-deadline")
    try:
        (tmp_path / "test-deadline-0.train_step").touch()
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"^train_step: no answer from test-deadline-0 within 6 s "
                                                   r"\(learner.step_deadline_s \+ learner.step_deadline_per_sample_s"):
            group.train_step(grpo_batch)  # 6 samples: 3 s + 6 x 0.5 s
        assert 6 <= time.monotonic() - started < 20
    finally:
        group.shutdown()


@pytest.mark.slow
def test_zero3_resume_in_new_ranks_and_export_matches_vllm(
    ray_local, tiny_qwen_dir, tiny_processor, grpo_batch, tmp_path, s3_uri
):
    """The checkpoint goes through an S3 bucket (moto's server on loopback): each rank stages and
    uploads its own shard, and the fresh ranks download only the files they read."""
    from learner.group import LearnerGroup

    settings, run = _settings(3), _run(tiny_qwen_dir)
    root = Storage(s3_uri).child("zero3").location
    group = LearnerGroup(settings, run, name_prefix="test-zero3")
    try:
        next_batch = _check_grpo_step(group, grpo_batch, tiny_qwen_dir, tiny_processor)
        assert group.save_checkpoint(root, {"step": 1}).endswith("zero3/step_1")
        uninterrupted = group.train_step(next_batch)
        digest = group.weights_digest()
    finally:
        group.shutdown()

    group = LearnerGroup(settings, run, name_prefix="test-zero3")  # a fresh job resuming from the checkpoint
    try:
        assert group.load_checkpoint(root)["step"] == 1
        assert not Storage(root).staging_dir("step_1.rank1").exists()  # downloads are cleared
        resumed = group.train_step(next_batch)
        assert group.weights_digest() == digest
        assert resumed["loss"] == uninterrupted["loss"] and resumed["grad_norm"] == uninterrupted["grad_norm"]
        exported = Path(group.export_hf(tmp_path / "export"))
        _check_weight_sync_sends_the_exported_weights(group, exported)
        _check_vllm_matches_learner(exported, group, grpo_batch)
    finally:
        group.shutdown()


def _push_to_this_process(group, version: int) -> tuple[dict[str, torch.Tensor], dict[str, int], Any]:
    """This process joins the weight group as a receiver; every rank takes part (ZeRO-3 ranks
    gather) while rank 0 sends. Returns what arrived, the sender's report and the plan."""
    from concurrent.futures import ThreadPoolExecutor

    from segr1.weightsync.weight_sync import BucketPlan, join_group, receive_buckets

    host, port = group.weight_sync_address()
    with ThreadPoolExecutor(max_workers=1) as pool:
        joined = pool.submit(group.init_weight_sync, host, port, 2)  # blocks until we join too
        receiver = join_group(host, port, 1, 2, "gloo", secret=group.secret, timeout_s=300)
        plan = BucketPlan.from_json(joined.result(timeout=300))
        sent = pool.submit(group.broadcast_weights, version)
        received = {name: tensor.clone() for name, tensor in receive_buckets(receiver, plan, version)}
        return received, sent.result(timeout=300), plan


def _check_weight_sync_sends_the_exported_weights(group, model_dir: Path) -> None:
    from transformers import AutoModelForImageTextToText

    received, sent, plan = _push_to_this_process(group, 1)
    weights = sum(slot.nbytes for bucket in plan.buckets for slot in bucket.slots)
    assert sent == {"bytes": plan.total_bytes, "staged": weights}  # ZeRO-3's gathers are copied as they come
    assert group.weight_version == 1
    with pytest.raises(ValueError, match="must not go back"):
        group.broadcast_weights(0)
    expected = dict(AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).named_parameters())
    assert received.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(received[name], tensor.detach()), name


def _check_vllm_matches_learner(model_dir: Path, group, samples: list[TrainSample]) -> None:
    """vLLM samples from the exported directory; the learner checks its prompts and scores the same tokens.

    A sample whose prompt the engine saw otherwise is refused on every rank, naming its group:
    under ZeRO-3 a rank that failed alone would leave the other blocked in the next gather.
    """
    import ray
    from PIL import Image
    from vllm import LLM, SamplingParams

    from actors.vision_ban import VISION_TOKEN_BAN

    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    llm = LLM(  # as the rollout engines sample: the vision ban, and the log-probs of what is sampled
        model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=1024,
        limit_mm_per_prompt={"image": 1, "video": 0}, kv_cache_memory_bytes=128 << 20, seed=0,
        logits_processors=[VISION_TOKEN_BAN], logprobs_mode="processed_logprobs",
    )
    try:
        firsts = [samples[0], samples[3]]  # one per group
        params = SamplingParams(n=2, max_tokens=6, logprobs=0, seed=0)
        outputs = llm.generate(
            [{"prompt": s.prompt, "multi_modal_data": {"image": Image.fromarray(ray.get(s.image))}} for s in firsts],
            params,
        )
    finally:
        llm.llm_engine.engine_core.shutdown()
    sampled = []
    for sample, output in zip(firsts, outputs):
        for completion in output.outputs:
            ids = list(completion.token_ids)
            logprobs = [step[token].logprob for step, token in zip(completion.logprobs, ids)]
            sampled.append(TrainSample(
                sample.group_id, sample.prompt, sample.image, ids, logprobs, 0.0, 1,
                prompt_length=len(output.prompt_token_ids), prompt_sha256=prompt_digest(output.prompt_token_ids),
            ))
    learner = group.compute_logprobs(sampled)
    for sample, ours in zip(sampled, learner):
        assert np.allclose(ours, sample.behavior_logprobs, atol=1e-4), (ours, sample.behavior_logprobs)
    tampered = replace(sampled[-1], prompt_length=sampled[-1].prompt_length + 1)
    with pytest.raises(ValueError, match=rf"group {tampered.group_id}: the rollout engine's prompt has"):
        group.compute_logprobs([*sampled[:-1], tampered])
