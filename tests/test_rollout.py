"""Rollout actors on a real vLLM engine (tiny Qwen2.5-VL, float32, CPU) and real weight sync.

The policy's reference log-probs come from the Hugging Face model through the learner's own
input path (``learner.inputs``), so a pass here also means rollout and learner agree on prompt
tokens, image processing and log-probs. Weights travel over the real gloo group, from a
``WeightSender`` in this process (the learner's rank 0) to the engines.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from actors.rollout import RolloutActor, RolloutSettings, SamplingSettings
from learner.inputs import PromptCache, Sampled, collate, completion_logits, load_processor, process_prompt
from learner.weight_sender import WeightSender, weight_meta
from segr1.core.frames import PixelBounds
from segr1.core.policy import ModelSettings
from segr1.core.prompts import build_messages, render_prompt
from segr1.core.schema import PromptItem, RolloutGroup, SampleScore, ScoredGroup, TrainSample, train_samples
from segr1.testing.layouts import zero2_like
from segr1.weightsync.weight_sync import WeightSyncError, tensor_places

pytestmark = pytest.mark.slow

MATCH_TOL = 1e-4  # float32 engine vs float32 HF: measured ~1e-6
CONTROL_MIN = 0.1  # weights that were not pushed must be visibly different, not within noise


# Not the checkpoint's own bounds: the 112 px test images are resized to 56 px (4 image tokens,
# not 16), so the learner's processor must be given these too or the prompts would disagree.
MIN_PIXELS = MAX_PIXELS = 56 * 56
FRAME = PixelBounds(MIN_PIXELS, MAX_PIXELS).frame((112, 112))  # (56, 56): the answers' frame


def model_for(model_dir: Path) -> ModelSettings:
    return ModelSettings(path=str(model_dir), dtype="float32", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


ENGINE = RolloutSettings(max_model_len=1024, kv_cache_memory_bytes=64 << 20, enforce_eager=True)


@pytest.fixture(scope="module")
def policy(tiny_qwen_dir: Path) -> dict[str, Any]:
    """The HF copy of the policy (the learner's side) and its processor."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = load_processor(str(tiny_qwen_dir), MIN_PIXELS, MAX_PIXELS)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen_dir, dtype=torch.float32).eval()
    return {"model": model, "processor": processor}


@pytest.fixture(scope="module")
def items(policy: dict[str, Any]) -> list[PromptItem]:
    prompt = render_prompt(policy["processor"], build_messages("cod"))
    rng = np.random.default_rng(0)
    return [
        PromptItem(f"g{i}", f"r{i}", prompt, rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), FRAME)
        for i in range(3)
    ]


@pytest.fixture(scope="module")
def actor(tiny_qwen_dir: Path) -> Iterator[RolloutActor]:
    actor = RolloutActor(model_for(tiny_qwen_dir), ENGINE, name="local")
    yield actor
    actor.shutdown()


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def hf_logprobs(policy: dict[str, Any], group: RolloutGroup, sampled: Sampled | None = None) -> list[torch.Tensor]:
    """The HF policy's log-probs of each completion's tokens, via the learner's input path, of the
    distribution ``sampled`` (the learner's at temperature 1 unless given)."""
    processor = policy["processor"]
    item = group.item
    prompt = process_prompt(processor, item.prompt, item.image, item.group_id)
    assert prompt.input_ids.tolist() == group.prompt_token_ids  # same tokens, same image placeholders
    samples = [
        TrainSample(item.group_id, item.prompt, item.image, c.token_ids, c.logprobs, 0.0, group.weight_version)
        for c in group.completions
    ]
    batch = collate(samples, [prompt] * len(samples), processor.tokenizer.pad_token_id)
    with torch.no_grad():
        sampled = sampled or Sampled.of(processor, policy["model"].config)
        lp = sampled.logprobs(completion_logits(policy["model"], batch), batch.completion_ids)
    return [lp[i, : len(c.token_ids)] for i, c in enumerate(group.completions)]


def max_logprob_gap(policy: dict[str, Any], groups: list[RolloutGroup], sampled: Sampled | None = None) -> float:
    gaps = [
        (ref - torch.tensor(c.logprobs)).abs().max().item()
        for g in groups
        for ref, c in zip(hf_logprobs(policy, g, sampled), g.completions)
    ]
    return max(gaps)


def push(sender: WeightSender, model: torch.nn.Module, version: int, receive: Callable[[dict], Any],
         planned: list[tuple[str, torch.Tensor]] | None = None,
         streamed: list[tuple[str, torch.Tensor]] | None = None) -> Any:
    """One sync: the sender streams in a thread while ``receive(plan)`` runs the receiving side.

    By default the model's parameters are both planned and streamed; ``planned``/``streamed``
    replace either, to break the sync on purpose.
    """
    named = zero2_like([(n, p.detach()) for n, p in model.named_parameters()])  # the learner's memory
    planned = planned if planned is not None else named
    streamed = streamed if streamed is not None else planned
    plan = sender.plan(weight_meta(planned), tensor_places(planned))  # as the learner plans below ZeRO-3
    assert any(len(bucket.segments) > 1 for bucket in plan.buckets)  # big tensors go out from their memory
    outcome: dict[str, Any] = {}

    def send() -> None:
        try:
            outcome["sent"] = sender.send(iter(streamed), version, in_place=True)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        return receive(plan.to_json())
    finally:
        thread.join(120)
        assert not thread.is_alive(), "the sender is still blocked"
        if "error" in outcome:
            raise outcome["error"]


def form_group(sender: WeightSender, world_size: int, join: Callable[[str, int], Any]) -> Any:
    host, port = sender.address()
    thread = threading.Thread(target=sender.join, args=(world_size,), daemon=True)
    thread.start()
    try:
        return join(host, port)
    finally:
        thread.join(120)
        assert not thread.is_alive(), "the sender never completed the join"


# ---------------------------------------------------------------------------------------------
# One engine in this process


def test_generate_returns_one_group_of_g_completions_per_prompt(actor, items, policy):
    sampling = SamplingSettings(n=3, temperature=1.0, max_tokens=16, seed=7)
    groups = actor.generate(items[:2], sampling)
    assert [g.group_id for g in groups] == ["g0", "g1"]
    for group in groups:
        assert group.weight_version == 0 and group.actor == "local"
        assert len(group.completions) == 3
        for c in group.completions:
            assert 1 <= len(c.token_ids) <= 16 and len(c.logprobs) == len(c.token_ids)
            assert all(np.isfinite(c.logprobs)) and max(c.logprobs) <= 0.0
            assert c.finish_reason in ("stop", "length")
            assert c.text == policy["processor"].tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert len({tuple(c.token_ids) for c in group.completions}) == 3  # G distinct samples
    again = actor.generate(items[:2], sampling)
    def tokens(gs: list[RolloutGroup]) -> list[list[list[int]]]:
        return [[c.token_ids for c in g.completions] for g in gs]

    assert tokens(again) == tokens(groups)
    # a prompt's samples do not depend on which other prompts share its batch
    alone = actor.generate(items[1:2], sampling)
    assert [c.token_ids for c in alone[0].completions] == [c.token_ids for c in groups[1].completions]


def test_a_call_past_the_engines_token_budget_samples_as_small_ones_do(actor, items):
    """One call per engine holds a whole step: 48 seeded samples of 16 prompts pass vLLM's 4096-token
    prefill budget. A chunked prefill there rewound each request's seeded generator, which a CPU
    generator cannot do, and the call failed; whole prefills sample as the small calls do."""
    sampling = SamplingSettings(n=3, temperature=1.0, max_tokens=8, seed=11)
    many = [replace(items[i % len(items)], group_id=f"m{i}") for i in range(16)]
    groups = actor.generate(many, sampling)
    assert sum(len(g.prompt_token_ids) for g in groups) * sampling.n > 4096
    alone = actor.generate(many[5:6], sampling)
    assert [c.token_ids for c in alone[0].completions] == [c.token_ids for c in groups[5].completions]


def test_learner_processor_uses_the_engines_image_bounds(actor, items, policy, tiny_qwen_dir):
    group = actor.generate(items[:1], SamplingSettings(n=2, max_tokens=4, seed=0))[0]
    learner_ids = process_prompt(policy["processor"], items[0].prompt, items[0].image, "g0").input_ids.tolist()
    assert learner_ids == group.prompt_token_ids
    pad = policy["processor"].tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert group.prompt_token_ids.count(pad) == 4  # 112 px resized to 56 px: 2 x 2 merged patches
    # the checkpoint's own bounds keep 112 px: a learner without the engine's bounds would disagree
    default = load_processor(str(tiny_qwen_dir))
    assert process_prompt(default, items[0].prompt, items[0].image, "g0").input_ids.tolist().count(pad) == 16

    # The engine's prompt length and digest travel with the train samples; the learner checks them.
    samples = train_samples(ScoredGroup(group, [SampleScore(0.0, {})] * 2), [0.5, -0.5])
    assert all(s.prompt_length == len(group.prompt_token_ids) for s in samples)
    cache = PromptCache(policy["processor"])
    for sample in samples:  # the engine's bounds: accepted
        cache.get(sample)
    with pytest.raises(ValueError, match=rf"group g0: the rollout engine's prompt has {len(learner_ids)} tokens .* "
                                         rf"the learner's has {len(learner_ids) + 12} .*min_pixels/max_pixels"):
        PromptCache(default).get(samples[0])  # other bounds: 16 image pads where the engine had 4
    with pytest.raises(ValueError, match="group g0: the rollout engine's prompt"):
        cache.get(replace(samples[1], prompt_sha256=samples[1].prompt_sha256[::-1]))  # tampered in transit


def test_vision_tokens_are_never_sampled(actor, items, policy):
    from PIL import Image
    from vllm import SamplingParams

    vision = set(actor.vision_token_ids())
    assert len(vision) == 5  # <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> <|video_pad|>
    sampling = SamplingSettings(n=8, temperature=1.0, max_tokens=128, seed=3)
    groups = actor.generate(items[:1], sampling)
    sampled = [t for c in groups[0].completions for t in c.token_ids]
    assert len(sampled) > 500 and not vision & set(sampled)
    # The ban is the engine's (VisionTokenBan), for every request: a plain one without any mask writes
    # none either, and its top 20 candidates never hold one.
    prompt = {"prompt": items[0].prompt, "multi_modal_data": {"image": Image.fromarray(items[0].image)}}
    params = SamplingParams(n=8, temperature=1.0, max_tokens=128, seed=3, logprobs=20)
    (out,) = actor.llm.generate([prompt], params, use_tqdm=False)
    plain = {t for c in out.outputs for t in c.token_ids}
    candidates = {t for c in out.outputs for step in c.logprobs for t in step}
    assert len(plain) > 50 and not vision & plain and not vision & candidates
    # Yet the random policy weighs them: a distribution that keeps them gives other log-probs.
    assert max_logprob_gap(policy, groups, Sampled()) > 1e-3


def test_bad_images_are_rejected_naming_the_record(actor, items):
    # The driver computed the frame with other bounds than the engine's: 4 image tokens, not 64.
    wrong_size = PromptItem("gx", "rec-7", items[0].prompt, items[0].image, (224, 224))
    with pytest.raises(ValueError, match="rec-7.*4 image tokens.*224x224 means 64"):
        actor.generate([wrong_size], SamplingSettings(n=1, max_tokens=2))
    gray = PromptItem("gy", "rec-8", items[0].prompt, items[0].image[..., 0], (112, 112))
    with pytest.raises(ValueError, match="rec-8.*uint8 HxWx3"):
        actor.generate([gray], SamplingSettings(n=1, max_tokens=2))


@pytest.fixture(scope="module")
def local_sender(actor) -> WeightSender:
    sender = WeightSender(bucket_bytes=256 << 10)  # several buckets even for the tiny model
    ranks = form_group(sender, 2, lambda host, port: actor.join_weight_group(host, port, 1, 2, sender.secret))
    assert ranks == [1]
    return sender


def test_pushed_weights_reproduce_the_hf_policy_log_probs(actor, items, policy, local_sender):
    model = policy["model"]
    sampling = SamplingSettings(n=4, temperature=1.0, max_tokens=24, seed=11)
    perturb(model, seed=1)
    assert push(local_sender, model, 1, lambda plan: actor.receive_weights(plan, 1)) == 1
    assert actor.weight_version() == 1
    groups = actor.generate(items[:2], sampling)
    assert all(g.weight_version == 1 for g in groups)
    assert max_logprob_gap(policy, groups) < MATCH_TOL

    # control: the learner moves on but the push is skipped -> the engine's log-probs are stale
    perturb(model, seed=2)
    assert max_logprob_gap(policy, groups) > CONTROL_MIN

    # the next push brings the engine back in line, and the version advances
    push(local_sender, model, 2, lambda plan: actor.receive_weights(plan, 2))
    groups = actor.generate(items[:2], sampling)
    assert actor.weight_version() == 2 and all(g.weight_version == 2 for g in groups)
    assert max_logprob_gap(policy, groups) < MATCH_TOL


def test_the_engines_log_probs_are_of_the_distribution_sampled(actor, items, policy):
    """At temperature 0.7 the engine returns the log-probs of what it sampled from: the learner's at
    0.7 with the banned ids removed; neither the temperature-1 ones nor those that keep the banned ids."""
    groups = actor.generate(items[:2], SamplingSettings(n=4, temperature=0.7, max_tokens=24, seed=5))
    processor, config = policy["processor"], policy["model"].config
    assert max_logprob_gap(policy, groups, Sampled.of(processor, config, temperature=0.7)) < MATCH_TOL
    assert max_logprob_gap(policy, groups, Sampled.of(processor, config, temperature=1.0)) > CONTROL_MIN
    assert max_logprob_gap(policy, groups, Sampled(temperature=0.7)) > 1e-3  # the banned ids kept


def renamed(named: list[tuple[str, torch.Tensor]], index: int, name: str) -> list[tuple[str, torch.Tensor]]:
    out = list(named)
    out[index] = (name, out[index][1])
    return out


def test_a_failed_sync_blocks_sampling_until_a_full_sync(actor, items, policy, local_sender):
    model = policy["model"]
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    middle = len(named) // 2

    # the sender's stream stops matching the plan half way: every rank aborts the sync
    version = actor.weight_version()
    with pytest.raises(WeightSyncError, match="aborted"):
        push(local_sender, model, version + 1, lambda plan: actor.receive_weights(plan, version + 1),
             streamed=renamed(named, middle, "not.in.the.plan"))
    assert actor.weight_version() == version  # a failed sync does not advance the version
    with pytest.raises(RuntimeError, match="refuses to sample"):
        actor.generate(items[:1], SamplingSettings(n=1, max_tokens=4))

    # the wire is fine but vLLM's loader rejects a name: the sync is still fully received
    with pytest.raises(ValueError, match="no module or parameter named 'bogus'"):
        push(local_sender, model, version + 1, lambda plan: actor.receive_weights(plan, version + 1),
             planned=renamed(named, middle, "bogus.weight"))
    assert actor.weight_version() == version
    with pytest.raises(RuntimeError, match="refuses to sample"):
        actor.generate(items[:1], SamplingSettings(n=1, max_tokens=4))

    # a full sync over the same group heals the engine
    perturb(model, seed=3)
    push(local_sender, model, version + 1, lambda plan: actor.receive_weights(plan, version + 1))
    groups = actor.generate(items[:1], SamplingSettings(n=2, max_tokens=16, seed=5))
    assert groups[0].weight_version == version + 1
    assert max_logprob_gap(policy, groups) < MATCH_TOL


# ---------------------------------------------------------------------------------------------
# A pool of Ray actors


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_qwen_dir: Path):
    from actors.rollout import RolloutPool

    pool = RolloutPool(model_for(tiny_qwen_dir), replace(ENGINE, num_actors=2, max_restarts=2), use_gpu=False)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def pool_sync(pool) -> dict[str, Any]:
    """The sender for the pool's group, and the (version, address) the pool was last synced to."""
    return {"sender": WeightSender(bucket_bytes=256 << 10), "version": 0, "address": None}


def sync_pool(pool, state: dict[str, Any], model: torch.nn.Module, version: int) -> None:
    """What the driver does: re-form the group when an actor is out of it, then push."""
    import ray

    sender = state["sender"]
    if state["address"] is None or pool.out_of_sync(state["version"], state["address"]):
        address = sender.address()
        ranks = form_group(
            sender, pool.world_size, lambda host, port: ray.get(pool.join_weight_group(host, port, sender.secret))
        )
        assert sorted(r for rs in ranks for r in rs) == list(range(1, pool.world_size))
        state["address"] = address
    push(sender, model, version, lambda plan: ray.get(pool.receive_weights(plan, version)))
    state["version"] = version


def greedy(pool, item: PromptItem) -> list[RolloutGroup]:
    """The same greedy prompt on every actor of the pool."""
    import ray

    sampling = SamplingSettings(n=1, temperature=0.0, max_tokens=24)
    return [ray.get(a.generate.remote([item], sampling))[0] for a in pool.actors]


def wait_restarted(actor, timeout_s: float = 300.0) -> int:
    """The weight version of a killed actor once Ray has restarted it."""
    import ray
    from ray.exceptions import RayActorError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(actor.weight_version.remote(), timeout=timeout_s)
        except RayActorError:  # the call reached the dying instance; the restart is on its way
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def test_two_actors_receive_identical_weights(pool, pool_sync, policy, items):
    import ray

    model = policy["model"]
    perturb(model, seed=21)
    # a rollout already queued on each actor finishes on the old weights before the load starts
    queued = [a.generate.remote(items[:1], SamplingSettings(n=1, max_tokens=8, seed=1)) for a in pool.actors]
    sync_pool(pool, pool_sync, model, 1)
    assert [g[0].weight_version for g in ray.get(queued)] == [0, 0]
    assert pool.weight_versions() == {"rollout-0": 1, "rollout-1": 1}
    first, second = greedy(pool, items[0])
    assert first.actor == "rollout-0" and second.actor == "rollout-1"
    assert first.completions[0].token_ids == second.completions[0].token_ids
    assert first.completions[0].logprobs == second.completions[0].logprobs
    assert first.weight_version == second.weight_version == 1
    assert max_logprob_gap(policy, [first, second]) < MATCH_TOL


def test_pool_resubmits_the_prompts_of_a_killed_actor(pool, items):
    import ray

    sampling = SamplingSettings(n=2, max_tokens=32, seed=9)
    batches = [[PromptItem(f"k{i}", f"k{i}", it.prompt, ray.put(it.image), it.policy_size)]
               for i, it in enumerate(items * 2)]
    tasks = [pool.submit(batch, sampling) for batch in batches]
    victim = pool.actors[0]
    on_victim = [t for t in tasks if t.actor_index == 0]
    assert on_victim  # it holds work when it dies
    killed_at = time.monotonic()
    ray.kill(victim, no_restart=False)
    pool.pool.wait_all()
    assert [t.result[0].group_id for t in tasks] == [b[0].group_id for b in batches]
    assert all(len(t.result[0].completions) == 2 for t in tasks)
    assert any(t.started_at > killed_at for t in on_victim)  # its prompts were dispatched again
    # Ray restarted it: a fresh engine at version 0, outside the weight group
    assert wait_restarted(victim) == 0
    assert ray.get(victim.weight_group.remote()) is None


def test_a_restarted_actor_is_brought_up_to_date(pool, pool_sync, policy, items):
    import ray

    model = policy["model"]
    if not pool.out_of_sync(pool_sync["version"], pool_sync["address"] or ("", 0)):
        ray.kill(pool.actors[0], no_restart=False)  # running alone: make the late joiner here
        assert wait_restarted(pool.actors[0]) == 0
    assert "rollout-0" in pool.out_of_sync(pool_sync["version"], pool_sync["address"] or ("", 0))
    old_address = pool_sync["address"]
    perturb(model, seed=22)
    version = pool_sync["version"] + 1
    sync_pool(pool, pool_sync, model, version)
    assert pool_sync["address"] != old_address  # a fresh rendezvous with every actor in it
    assert pool.out_of_sync(version, pool_sync["address"]) == []
    first, second = greedy(pool, items[1])
    assert first.completions[0].token_ids == second.completions[0].token_ids
    assert first.weight_version == second.weight_version == version
    assert max_logprob_gap(policy, [first, second]) < MATCH_TOL


def test_an_engine_resizes_with_bounds_larger_than_the_checkpoints(tiny_qwen_dir, tmp_path):
    """A checkpoint whose processor config names its own bounds as flat ``min_pixels``/``max_pixels``
    (Qwen2.5-VL-3B-Instruct's does, with 12845056; a segr1 export carries its run's) and an engine
    given the project's 768 x 768: a 768 px image must be seen at 756 px, 729 image tokens, as the
    learner's processor sees it. Given as a ``size`` override alone, vLLM 0.32 and transformers 5
    both let the checkpoint's flat bound win: 9 image tokens, and the frame check refused the prompt."""
    import json
    import shutil

    checkpoint = tmp_path / "flat-bounds"
    shutil.copytree(tiny_qwen_dir, checkpoint)
    config = json.loads((checkpoint / "processor_config.json").read_text())
    config["image_processor"].update(min_pixels=3136, max_pixels=112 * 112)
    (checkpoint / "processor_config.json").write_text(json.dumps(config))
    big = PixelBounds(3136, 768 * 768)
    model = ModelSettings(path=str(checkpoint), dtype="float32", min_pixels=big.min_pixels, max_pixels=big.max_pixels)
    actor = RolloutActor(model, replace(ENGINE, max_model_len=2048), name="big-bounds")
    try:
        processor = load_processor(str(checkpoint), big.min_pixels, big.max_pixels)
        image = np.random.default_rng(1).integers(0, 256, (768, 768, 3), dtype=np.uint8)
        item = PromptItem("gb", "rb", render_prompt(processor, build_messages("cod")), image, big.frame((768, 768)))
        assert item.policy_size == (756, 756)
        (group,) = actor.generate([item], SamplingSettings(n=1, temperature=0.0, max_tokens=2))
        pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert group.prompt_token_ids.count(pad) == 729
        assert group.prompt_token_ids == process_prompt(processor, item.prompt, image, "gb").input_ids.tolist()
    finally:
        actor.shutdown()
