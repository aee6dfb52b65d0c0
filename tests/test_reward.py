"""Reward actors: SAM2 batched decoding, whole-group scoring, the Ray pool, bad input.

The SAM2 tests use the tiny random hiera-tiny at 256 px (``tiny_sam2``): its masks are meaningless
but deterministic, which is all an equality test needs. The reference for "same masks and rewards"
is the straightforward loop the paper's code runs: ``set_image`` and ``predict`` per sample.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass

import numpy as np
import pytest
import ray
import torch
from PIL import Image
from ray.exceptions import RayActorError

from actors.reward import RewardActor, RewardSettings, actor_options, make_reward_pool
from segr1.core.parser import parse_completion
from segr1.core.prompts import answer_text
from segr1.core.rewards import RewardWeights, score
from segr1.core.schema import Completion, PromptItem, RolloutGroup
from segr1.core.segment import MaskPrompt
from segr1.data.records import decode_mask, encode_jpeg, encode_mask
from segr1.data.synth import synth_record
from segr1.segmenters.settings import Sam2Settings

IMAGE_W, IMAGE_H = 96, 80  # not square, to catch swapped axes
POLICY_SIZE = (192, 160)  # the policy saw the image at twice the size: coordinates must be scaled
NEAR_ZERO = 1e-4  # logits this close to the mask threshold may flip under a different matmul order

GARBAGE = [
    "",
    "no tags at all",
    "<think>hmm</think> <bbox>[1,2,3]</bbox>, <points>[[1,2]]</points>, <labels>[1]</labels>",
    "<think>x</think> <bbox>[nan, 1, 2, 3]</bbox> <points>[[1e999, 2]]</points> <labels>[1]</labels>",
    "<bbox>" + "[" * 10_000 + "</bbox>",
    "<points>[[1,2],[3,4]]</points><labels>[1]</labels>",
    "<labels>[2]</labels><points>[[__import__('os')]]</points>",
    "\x00\udcff<think>\u202e</think><bbox>[0,0,9e9,1]</bbox>",
]


def _completion(text: str) -> Completion:
    return Completion(token_ids=[1, 2], text=text, logprobs=[-0.1, -0.2], finish_reason="stop")


def _group(image, texts, record_id="rec-0", policy_size=POLICY_SIZE, task="cod") -> RolloutGroup:
    item = PromptItem(group_id=f"g-{record_id}", record_id=record_id, prompt="p", image=image,
                      policy_size=policy_size, task=task)
    return RolloutGroup(item=item, prompt_token_ids=[1], completions=[_completion(t) for t in texts],
                        weight_version=0)


def _candidate_texts(gt: np.ndarray, rng: np.random.Generator, count: int) -> list[str]:
    """Plausible answers around the object in policy coordinates: one or two boxes, 0-4 points."""
    sx, sy = POLICY_SIZE[0] / gt.shape[1], POLICY_SIZE[1] / gt.shape[0]
    rows, cols = np.nonzero(gt)
    x1, y1, x2, y2 = cols.min() * sx, rows.min() * sy, cols.max() * sx, rows.max() * sy
    texts = []
    for i in range(count):
        jitter = rng.normal(0, 8, (1 + (i % 3 == 2), 4))
        boxes = np.array([x1, y1, x2, y2]) + jitter
        n = int(rng.integers(0, 5))
        points = np.column_stack([rng.uniform(x1, x2, n), rng.uniform(y1, y2, n)])
        labels = rng.integers(0, 2, n)
        texts.append(answer_text(boxes=None if i % 4 == 3 else boxes, points=points, labels=labels, think="t"))
    return texts


@pytest.fixture(scope="module")
def record():
    return synth_record(0, size=(IMAGE_W, IMAGE_H))


def _sam2(tiny_sam2) -> Sam2Settings:
    return Sam2Settings(config=tiny_sam2.config, checkpoint=str(tiny_sam2.checkpoint), image_size=tiny_sam2.image_size)


def _reward(**overrides) -> RewardSettings:
    return RewardSettings(**{"bf16": False, "num_cpus_per_actor": 0.5, **overrides})


BOX = Sam2Settings(backend="box")


# --------------------------------------------------------------------------- box backend, bad input


def test_box_backend_rewards_are_the_known_values():
    gt = np.zeros((IMAGE_H, IMAGE_W), bool)
    gt[20:60, 10:50] = True  # rows 20..59, columns 10..49
    image = np.full((IMAGE_H, IMAGE_W, 3), 90, np.uint8)
    actor = RewardActor(Sam2Settings(backend="box", box_point_radius=0.0), RewardSettings())
    exact = answer_text(boxes=[[10, 20, 50, 60]], points=[[30, 40]], labels=[1], think="t")
    half = answer_text(boxes=[[10, 20, 30, 60]], points=[[20, 40]], labels=[1], think="t")
    no_think = answer_text(boxes=[[10, 20, 50, 60]], points=[[30, 40]], labels=[1])
    scores = actor.score_group(_group(image, [exact, half, no_think, "garbage"], policy_size=(IMAGE_W, IMAGE_H)), gt)
    assert scores[0].reward == pytest.approx(1.0 + 0.7 + 0.3)
    assert scores[0].parts["iou"] == pytest.approx(1.0)
    assert scores[1].parts["iou"] == pytest.approx(0.5)
    assert scores[2].parts["format"] == 0.0 and scores[2].parts["iou"] == pytest.approx(1.0)
    assert scores[3].reward == 0.0 and scores[3].parse_errors == () and scores[3].num_boxes == 0
    assert [s.num_points for s in scores] == [1, 1, 1, 0]


def test_any_completion_text_scores_without_raising(record):
    actor = RewardActor(BOX, RewardSettings())
    scores = actor.score_group(_group(record.image, GARBAGE), record.mask)
    assert len(scores) == len(GARBAGE)
    for s in scores:
        assert np.isfinite(s.reward) and s.parts["format"] == 0.0
    # Only GARBAGE[2] keeps a usable part (its point; the 3-number box is rejected): it is scored
    # on segmentation alone. Everything else gives no prompt and reward 0.
    assert [s.reward == 0.0 for s in scores] == [i != 2 for i in range(len(GARBAGE))]
    assert scores[2].num_points == 1 and scores[2].num_boxes == 0 and scores[2].parse_errors
    assert sum(bool(s.parse_errors) for s in scores) == 6


def test_a_group_without_any_prompt_is_not_encoded(record):
    actor = RewardActor(BOX, RewardSettings())
    texts = [g for i, g in enumerate(GARBAGE) if i != 2]
    scores = actor.score_group(_group(record.image, texts), record.mask)
    assert [s.reward for s in scores] == [0.0] * len(texts)
    assert actor.stats.groups == 1 and actor.stats.encodes == 0


def test_bytes_and_arrays_give_the_same_scores_and_masks_come_back_as_png(record):
    actor = RewardActor(BOX, RewardSettings())
    texts = _candidate_texts(record.mask, np.random.default_rng(1), 4)
    from_arrays = actor.score_group(_group(record.image, texts), record.mask, return_masks=True)
    png_image = io.BytesIO()
    Image.fromarray(record.image).save(png_image, format="PNG")
    from_bytes = actor.score_group(_group(png_image.getvalue(), texts), encode_mask(record.mask))
    assert [s.reward for s in from_arrays] == [s.reward for s in from_bytes]
    assert all(s.mask_png is None for s in from_bytes)
    for text, s in zip(texts, from_arrays):
        mask = decode_mask(s.mask_png)
        prompt_set = parse_completion(text, POLICY_SIZE)
        assert score(prompt_set, mask, record.mask).total == pytest.approx(s.reward)


@pytest.mark.parametrize(
    "image, mask, reason",
    [
        ("mismatch", None, r"mask is 96x80 but image is 48x40"),
        (b"not an image at all", None, "cannot decode image"),
        (encode_jpeg(np.zeros((80, 96, 3), np.uint8))[:40], None, "cannot decode image"),
        (np.zeros((80, 96), np.uint8), None, "uint8 HxWx3"),
        (None, "0/255", "binary"),
        (None, b"\x89PNG broken", "cannot decode mask"),
    ],
)
def test_bad_images_and_masks_name_the_record(record, image, mask, reason):
    actor = RewardActor(BOX, RewardSettings())
    if isinstance(image, str):
        image = record.image[::2, ::2]
    image = record.image if image is None else image
    mask = record.mask if mask is None else (record.mask.astype(np.uint8) * 255 if mask == "0/255" else mask)
    with pytest.raises(ValueError, match=reason) as err:
        actor.score_group(_group(image, ["x"], record_id="bad-record-7"), mask)
    assert "bad-record-7" in str(err.value)


def test_unknown_task_names_the_record(record):
    actor = RewardActor(BOX, RewardSettings())
    with pytest.raises(ValueError, match="bad-task-3.*unknown task"):
        actor.score_group(_group(record.image, ["x"], record_id="bad-task-3", task="nope"), record.mask)


def test_custom_weights_reach_the_reward(record):
    weights = RewardWeights(format=0.5, iou=1.0, smeasure=0.0)
    actor = RewardActor(BOX, RewardSettings(weights=weights))
    text = _candidate_texts(record.mask, np.random.default_rng(3), 1)
    s = actor.score_group(_group(record.image, text), record.mask)[0]
    assert s.reward == pytest.approx(0.5 * s.parts["format"] + s.parts["iou"])


@pytest.mark.parametrize(
    "backend, num_gpus, cluster_gpus, expected",
    [("sam2", 1.0, 8, 1.0), ("sam2", 0.25, 1, 0.25), ("sam2", 1.0, 0, 0), ("box", 1.0, 8, 0), ("sam2", 0.0, 8, 0)],
)
def test_actors_ask_for_gpus_only_for_sam2_on_a_gpu_cluster(backend, num_gpus, cluster_gpus, expected):
    settings = RewardSettings(num_gpus_per_actor=num_gpus, num_cpus_per_actor=0.5, max_restarts=2)
    options = actor_options(Sam2Settings(backend=backend), settings, "reward-3", cluster_gpus=cluster_gpus)
    assert options == {"name": "reward-3", "num_cpus": 0.5, "num_gpus": expected, "max_restarts": 2,
                       "max_task_retries": 0}


def test_settings_refuse_nonsense():
    with pytest.raises(ValueError, match="backend"):
        Sam2Settings(backend="sam3")
    with pytest.raises(ValueError, match="multiple of 32"):
        Sam2Settings(image_size=48)
    with pytest.raises(ValueError, match=r"num_gpus_per_actor must be in \[0, 8\]"):
        RewardSettings(num_gpus_per_actor=-1)
    with pytest.raises(ValueError, match="decode_chunk"):
        RewardSettings(decode_chunk=-2)
    with pytest.raises(ValueError, match="decode_pad_to"):
        RewardSettings(decode_pad_to=-1)


# --------------------------------------------------------------------------- SAM2, in process


@pytest.fixture(scope="module")
def sam2_actor(tiny_sam2):
    return RewardActor(_sam2(tiny_sam2), _reward(decode_chunk=3), name="in-process")


@pytest.fixture(scope="module")
def reference_predictor(tiny_sam2):
    """An independent SAM2ImagePredictor from the same checkpoint, used as SAM2's own reference."""
    from segr1.segmenters.sam2_model import load_sam2_predictor

    return load_sam2_predictor(tiny_sam2.config, tiny_sam2.checkpoint, image_size=tiny_sam2.image_size)


def _predict_logits(predictor, box, points, labels) -> np.ndarray:
    logits, _, _ = predictor.predict(
        point_coords=points if len(points) else None,
        point_labels=labels if len(points) else None,
        box=box,
        multimask_output=False,
        return_logits=True,
    )
    return logits[0]


@dataclass
class Reference:
    reward: float
    mask: np.ndarray
    uncertain: np.ndarray  # pixels whose logit is within NEAR_ZERO of the threshold for some prompt


_REFERENCE_CACHE: dict[tuple, list[Reference]] = {}


def reference_scores(predictor, image, gt, texts, policy_size) -> list[Reference]:
    """The paper's loop: per sample, set the image, decode each box with the points inside it, OR."""
    key = (image.tobytes(), gt.tobytes(), tuple(texts), tuple(policy_size))
    if key not in _REFERENCE_CACHE:  # several tests score the same groups; the loop is the slow part
        _REFERENCE_CACHE[key] = _reference_scores(predictor, image, gt, texts, policy_size)
    return _REFERENCE_CACHE[key]


def _reference_scores(predictor, image, gt, texts, policy_size) -> list[Reference]:
    h, w = gt.shape
    scale = np.array([w / policy_size[0], h / policy_size[1]])
    results = []
    for text in texts:
        ps = parse_completion(text, policy_size)
        mask = np.zeros((h, w), bool)
        uncertain = np.zeros((h, w), bool)
        requests = []
        if not ps.is_empty:
            predictor.set_image(image)
            points, labels = ps.points * scale, ps.labels
            boxes = ps.boxes * np.tile(scale, 2)
            for box in boxes:
                inside = ((points >= box[:2]) & (points <= box[2:])).all(axis=1)
                requests.append((box, points[inside], labels[inside]))
            if len(boxes) == 0:
                requests.append((None, points, labels))
        for box, points, labels in requests:
            logits = _predict_logits(predictor, box, points, labels)
            mask |= logits > 0
            uncertain |= np.abs(logits) < NEAR_ZERO
        results.append(Reference(score(ps, mask, gt).total, mask, uncertain))
    return results


def assert_matches_reference(scores, references) -> None:
    """Same masks, hence the same rewards, up to pixels SAM2 itself puts within float noise of 0."""
    assert len(scores) == len(references)
    for i, (s, ref) in enumerate(zip(scores, references)):
        mask = decode_mask(s.mask_png)
        differ = mask != ref.mask
        assert not (differ & ~ref.uncertain).any(), f"sample {i}: {differ.sum()} pixels differ"
        if differ.any():
            assert s.reward == pytest.approx(ref.reward, abs=1e-3), f"sample {i}"
        else:
            assert s.reward == ref.reward, f"sample {i}"


def _mixed_prompts(rng: np.random.Generator, count: int) -> list[MaskPrompt]:
    """Prompts of 1 to 5 tokens, several of each count: points only, or a box with 0-3 points."""
    prompts = []
    for i in range(count):
        n = int(rng.integers(0, 4)) if i % 3 else int(rng.integers(1, 4))
        box = None if i % 3 == 0 else np.sort(rng.uniform(0, IMAGE_W, 4).reshape(2, 2), axis=0).T.ravel()[[0, 2, 1, 3]]
        prompts.append(MaskPrompt(box, rng.uniform(0, IMAGE_H, (n, 2)), rng.integers(0, 2, n)))
    return prompts


@pytest.mark.slow
def test_batched_decoding_equals_one_by_one_and_sam2_predict(sam2_actor, reference_predictor, record):
    segmenter = sam2_actor.segmenter
    prompts = _mixed_prompts(np.random.default_rng(0), 14)  # chunk size 3
    embedding = segmenter.embed(record.image)
    batches_before = segmenter.timings.batches
    batched = segmenter.decode(embedding, prompts)
    assert segmenter.timings.batches - batches_before < len(prompts)  # it really batched
    one_by_one = [segmenter.decode(embedding, [p])[0] for p in prompts]
    reference_predictor.set_image(record.image)
    for i, (a, b, p) in enumerate(zip(batched, one_by_one, prompts)):
        logits = _predict_logits(reference_predictor, p.box, p.points, p.labels)
        certain = np.abs(logits) >= NEAR_ZERO  # a batched matmul may move a logit by ~1e-7
        assert a.shape == (IMAGE_H, IMAGE_W) and a.dtype == bool
        assert np.array_equal(a[certain], b[certain]), f"prompt {i}: batched differs from one-by-one"
        assert np.array_equal(a[certain], (logits > 0)[certain]), f"prompt {i}: differs from SAM2's predict"
        assert certain.mean() > 0.99  # the exemption is a handful of pixels, not the test
    assert len({m.tobytes() for m in batched}) > len(prompts) // 2  # the masks really differ


@pytest.mark.slow
def test_identical_prompts_are_decoded_once(sam2_actor, record):
    segmenter = sam2_actor.segmenter
    embedding = segmenter.embed(record.image)
    box = np.array([10.0, 10.0, 70.0, 60.0])
    a = MaskPrompt(box, np.array([[30.0, 30.0]]), np.array([1]))
    b = MaskPrompt(None, np.array([[30.0, 30.0], [50.0, 50.0]]), np.array([1, 0]))
    a_again = MaskPrompt(box.copy(), np.array([[30.0, 30.0]]), np.array([1]))
    before = segmenter.timings.decoded
    masks = segmenter.decode(embedding, [a, b, a_again, b, a])
    assert segmenter.timings.decoded - before == 2
    assert np.array_equal(masks[0], masks[2]) and np.array_equal(masks[1], masks[3])
    assert not np.array_equal(masks[0], masks[1])
    masks[2][:] = False  # each caller gets its own array
    assert masks[0].any() and masks[4].any()


@pytest.mark.slow
def test_bf16_autocast_runs_and_stays_close_to_float32(tiny_sam2, sam2_actor, record):
    from segr1.segmenters.sam2_segmenter import load_sam2_segmenter

    bf16 = load_sam2_segmenter(tiny_sam2.config, tiny_sam2.checkpoint, tiny_sam2.image_size, autocast_bf16=True)
    prompts = [MaskPrompt(np.array([10.0, 10.0, 70.0, 60.0]), np.array([[30.0, 30.0]]), np.array([1])),
               MaskPrompt(None, np.array([[30.0, 30.0], [50.0, 50.0]]), np.array([1, 0]))]
    embedding = bf16.embed(record.image)
    assert embedding.high_res_feats[0].dtype == torch.bfloat16  # autocast really ran
    low = bf16.decode(embedding, prompts)
    full = sam2_actor.segmenter.decode(sam2_actor.segmenter.embed(record.image), prompts)
    for a, b in zip(low, full):
        assert (a == b).mean() > 0.95


@pytest.mark.slow
def test_padding_to_a_common_length_would_change_masks(sam2_actor, record):
    """Why padding must not depend on the batch: a -1 padding point is a real token (docs/reward.md)."""
    segmenter = sam2_actor.segmenter
    embedding = segmenter.embed(record.image)
    box = np.array([10.0, 10.0, 70.0, 60.0])
    plain = segmenter.decode(embedding, [MaskPrompt(box, np.zeros((0, 2)), np.zeros(0, int))])[0]
    padded = segmenter.decode(embedding, [MaskPrompt(box, np.zeros((1, 2)), np.array([-1]))])[0]
    assert not np.array_equal(plain, padded)


@pytest.mark.slow
def test_padded_decoding_batches_a_group_and_equals_padded_one_by_one(sam2_actor, record):
    """pad_to=N: every prompt of up to N tokens in one batch; each mask is that prompt decoded alone
    with N - length not-a-point tokens added, whatever else is in the batch."""
    from segr1.segmenters.sam2_segmenter import Sam2Segmenter, num_tokens

    exact = sam2_actor.segmenter
    padded = Sam2Segmenter(exact.predictor, chunk_size=16, pad_to=4)
    prompts = _mixed_prompts(np.random.default_rng(1), 14)
    lengths = [num_tokens(p) for p in prompts]
    assert min(lengths) < 4 < max(lengths)  # both padded prompts and longer ones, which keep their length
    embedding = padded.embed(record.image)
    before = padded.timings.batches
    batched = padded.decode(embedding, prompts)
    assert padded.timings.batches - before == 1 + len({n for n in lengths if n > 4})
    for i, (prompt, mask, n) in enumerate(zip(prompts, batched, lengths)):
        alone = padded.decode(embedding, [prompt])[0]
        pad = max(0, 4 - n)
        explicit = MaskPrompt(prompt.box, np.concatenate([prompt.points.reshape(-1, 2), np.zeros((pad, 2))]),
                              np.concatenate([prompt.labels, np.full(pad, -1)]))
        assert np.array_equal(alone, exact.decode(embedding, [explicit])[0]), f"prompt {i}"
        assert (mask != alone).mean() < 1e-3, f"prompt {i}: batched differs from one-by-one"  # matmul noise only
    assert len({m.tobytes() for m in batched}) > len(prompts) // 2


@pytest.mark.slow
def test_score_group_matches_the_per_sample_loop(sam2_actor, reference_predictor, record):
    texts = _candidate_texts(record.mask, np.random.default_rng(2), 8) + GARBAGE[:2]
    encodes_before = sam2_actor.segmenter.timings.images
    scores = sam2_actor.score_group(_group(record.image, texts), record.mask, return_masks=True)
    assert sam2_actor.segmenter.timings.images == encodes_before + 1  # one encode for the whole group
    assert_matches_reference(scores, reference_scores(reference_predictor, record.image, record.mask, texts, POLICY_SIZE))
    rewards = [s.reward for s in scores]
    assert len(set(rewards[:8])) > 2 and rewards[8:] == [0.0, 0.0]


# --------------------------------------------------------------------------- Ray pool


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_sam2):
    pool = make_reward_pool(_sam2(tiny_sam2), _reward(num_actors=2, max_restarts=2, max_in_flight_per_actor=1),
                            name_prefix="test-reward")
    pool.pool.call_all("info")  # wait until both have built SAM2
    yield pool
    pool.shutdown()


def _groups_and_masks(count: int, size=(IMAGE_W, IMAGE_H)):
    groups, masks, texts = [], [], []
    for i in range(count):
        rec = synth_record(i, size=size)
        t = _candidate_texts(rec.mask, np.random.default_rng(10 + i), 4) + ["garbage"]
        groups.append(_group(ray.put(rec.image), t, record_id=rec.id))
        masks.append(ray.put(rec.mask))
        texts.append((rec, t))
    return groups, masks, texts


@pytest.mark.slow
def test_pool_scores_like_the_per_sample_loop_and_spreads_load(pool, reference_predictor):
    groups, masks, texts = _groups_and_masks(3)
    results = pool.score(groups, masks, return_masks=True)
    for scores, (rec, t) in zip(results, texts):
        assert_matches_reference(scores, reference_scores(reference_predictor, rec.image, rec.mask, t, POLICY_SIZE))
    stats = pool.stats()
    assert set(stats) == {"test-reward-0", "test-reward-1"}
    assert all(s["alive"] and s["completed"] >= 1 and s["actor_groups_per_s"] > 0 for s in stats.values()), stats
    assert sum(s["actor_groups"] for s in stats.values()) >= 3
    assert ray.get(ray.get_actor("test-reward-1").info.remote())["device"] == "cpu"


def _wait_until_alive(actor, deadline_s: float) -> dict:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return ray.get(actor.info.remote(), timeout=deadline_s)
        except RayActorError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.slow
def test_group_of_a_killed_actor_is_scored_by_another(pool, reference_predictor):
    groups, masks, texts = _groups_and_masks(1)
    pid_before = ray.get(pool.actors[0].info.remote())["pid"]
    task = pool.submit(groups[0], masks[0], return_masks=True)
    assert task.actor_index == 0  # least loaded, first in order
    ray.kill(pool.actors[0], no_restart=False)  # mid-run: the group is in flight on it
    while not task.done:
        pool.poll(timeout=1.0)
    assert task.attempts == 2 and task.actor_index == 1
    rec, t = texts[0]
    assert_matches_reference(task.result, reference_scores(reference_predictor, rec.image, rec.mask, t, POLICY_SIZE))
    assert pool.stats()["test-reward-0"]["failures"] == 1
    # Ray restarts it (max_restarts): a new process that scores again. Calls made while it restarts
    # fail at once with ActorUnavailableError, so wait for it to answer.
    info = _wait_until_alive(pool.actors[0], deadline_s=180)
    assert info["pid"] != pid_before and info["pid"] != os.getpid()
    again = ray.get(pool.actors[0].score_group.remote(groups[0], masks[0]))
    assert [s.reward for s in again] == [s.reward for s in task.result]


@pytest.mark.slow
def test_pool_raises_a_bad_record_instead_of_dropping_it(pool):
    rec = synth_record(0, size=(IMAGE_W, IMAGE_H))
    group = _group(ray.put(rec.image), ["x"], record_id="broken-record-9")
    task = pool.submit(group, ray.put(rec.mask[:40]))
    with pytest.raises(ValueError, match="broken-record-9"):
        while not task.done:
            pool.poll(timeout=1.0)


@pytest.mark.slow
def test_a_death_while_the_other_actor_is_busy_does_not_stop_the_job(ray_cluster, record):
    pool = make_reward_pool(BOX, _reward(num_actors=2, max_restarts=2, max_in_flight_per_actor=1),
                            name_prefix="busy-reward")
    try:
        pool.pool.call_all("info")
        image, mask = ray.put(record.image), ray.put(record.mask)
        text = answer_text(boxes=[[10, 10, 40, 40]], points=[[20, 20]], labels=[1], think="t")
        # Slow groups (many candidates) keep the surviving actor busy while the other restarts, so
        # the failed group must wait for one of them rather than burn its attempts on the restarting one.
        groups = [_group(image, [text] * 2000, record_id=f"busy-{i}") for i in range(4)]
        tasks = [pool.submit(g, mask) for g in groups]
        ray.kill(pool.actors[0], no_restart=False)
        pool.pool.wait_all()
        assert all(len(t.result) == 2000 for t in tasks)
    finally:
        pool.shutdown()
