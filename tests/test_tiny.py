"""The tiny model factory: deterministic builds, and HF, vLLM and SAM2 all running the result.

The key check is `test_vllm_group_logprobs_match_hf`: the rollout (vLLM) and the learner (HF)
must see the same model, or every GRPO importance ratio is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from segr1.core.vocab import VISION_TOKENS
from segr1.segmenters.sam2_model import load_sam2_predictor
from segr1.testing.tiny import (
    MAX_PIXELS,
    Sam2Checkpoint,
    _build_once,
    build_qwen,
    build_sam2,
    default_cache_dir,
    main,
)

SEG_R1_ANSWER = (
    "<think>The frog is at the left.</think> <bbox>[12,30,88,91]</bbox>, "
    "<points>[[40,50],[60,70]]</points>, <labels>[1,0]</labels>"
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _image(height: int, width: int, seed: int = 0):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# --------------------------------------------------------------------------- building


def test_qwen_build_is_deterministic_and_follows_the_seed(tmp_path: Path, tiny_qwen_dir: Path) -> None:
    again = build_qwen(tmp_path, seed=0)
    assert again.name == tiny_qwen_dir.name
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha256(again / name) == _sha256(tiny_qwen_dir / name), name
    assert build_qwen(tmp_path, seed=0) == again  # cache hit

    other = build_qwen(tmp_path, seed=1)
    assert other.name != again.name
    assert _sha256(other / "model.safetensors") != _sha256(again / "model.safetensors")
    assert _sha256(other / "tokenizer.json") == _sha256(again / "tokenizer.json")  # ids stable across seeds


def test_concurrent_builders_share_one_complete_directory(tmp_path: Path) -> None:
    both_writing = threading.Barrier(2)

    def write(out: Path) -> None:
        (out / "owner").write_text(threading.current_thread().name)
        both_writing.wait(timeout=10)  # both builders are mid-build: the rename race is certain

    settings = {"kind": "race", "n": 1}
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: _build_once(tmp_path, settings, write), range(2)))
    assert paths[0] == paths[1]
    assert [p.name for p in tmp_path.iterdir()] == [paths[0].name]  # the loser's copy is gone
    assert (paths[0] / "owner").read_text()
    assert json.loads((paths[0] / "segr1_tiny.json").read_text()) == settings


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def write(out: Path) -> None:
        (out / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _build_once(tmp_path, {"kind": "broken"}, write)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEGR1_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "tiny"
    monkeypatch.delenv("SEGR1_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "segr1" / "tiny"


# --------------------------------------------------------------------------- tokenizer and config


def test_config_ids_equal_tokenizer_ids(tiny_qwen_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    config = AutoConfig.from_pretrained(tiny_qwen_dir)
    ids = dict(zip(VISION_TOKENS, tok.convert_tokens_to_ids(list(VISION_TOKENS))))
    assert config.image_token_id == ids["<|image_pad|>"]
    assert config.video_token_id == ids["<|video_pad|>"]
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    assert config.vision_end_token_id == ids["<|vision_end|>"]
    endoftext, im_end = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert (tok.eos_token_id, tok.pad_token_id) == (im_end, endoftext)
    assert config.text_config.eos_token_id == im_end
    assert config.text_config.pad_token_id == endoftext
    assert GenerationConfig.from_pretrained(tiny_qwen_dir).eos_token_id == [im_end, endoftext]
    assert config.text_config.vocab_size == len(tok)
    assert 1000 <= len(tok) <= 2000


def test_tokenizer_round_trips_a_seg_r1_answer(tiny_qwen_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    ids = tok(SEG_R1_ANSWER).input_ids
    assert tok.convert_tokens_to_ids("<think>") in ids and tok.convert_tokens_to_ids("</think>") in ids
    assert tok.decode(ids, skip_special_tokens=True) == SEG_R1_ANSWER  # think tags are not "special"
    assert len(ids) < len(SEG_R1_ANSWER) // 2  # BPE merged the common words and tags


# --------------------------------------------------------------------------- HF policy


@pytest.fixture(scope="module")
def hf_policy(tiny_qwen_dir: Path):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen_dir).eval()
    return processor, model


def _chat_text(processor) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find the frog."}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_chat_template_is_qwen_layout(hf_policy) -> None:
    processor, _ = hf_policy
    assert _chat_text(processor) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Find the frog.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(("side", "grid"), [(112, 8), (768, 14)])
def test_processor_caps_image_tokens(hf_policy, side: int, grid: int) -> None:
    processor, model = hf_policy
    inputs = processor(text=[_chat_text(processor)], images=[_image(side, side)], return_tensors="pt")
    # smart_resize floors to multiples of 28 under MAX_PIXELS: 768 px becomes 196 px, not 224.
    assert inputs.image_grid_thw.tolist() == [[1, grid, grid]]
    assert grid * grid * 14 * 14 <= MAX_PIXELS
    n_image_tokens = int((inputs.input_ids == model.config.image_token_id).sum())
    assert n_image_tokens == grid * grid // 4 == int(inputs.mm_token_type_ids.sum())


def test_hf_forward_and_generate_with_image(hf_policy) -> None:
    import torch

    processor, model = hf_policy
    inputs = processor(text=[_chat_text(processor)], images=[_image(112, 112)], return_tensors="pt")
    prompt_len = inputs.input_ids.shape[1]
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, prompt_len, len(processor.tokenizer))
    assert torch.isfinite(logits).all()

    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = generated[0, prompt_len:]
    assert generated.shape[0] == 1 and 1 <= len(new) <= 8
    assert generated[0, :prompt_len].tolist() == inputs.input_ids[0].tolist()
    assert new[0].item() == logits[0, -1].argmax().item()  # greedy step 1 = the forward's argmax
    assert isinstance(processor.decode(new, skip_special_tokens=True), str)


# --------------------------------------------------------------------------- vLLM vs HF


def hf_completion_logprobs(model, inputs, completion_ids: list[int], use_mm_token_type_ids: bool = True):
    """Log-probs the HF model gives each completion token after the processed prompt.

    The learner's recipe: append the completion to the prompt ids, extend `mm_token_type_ids`
    with zeros (without it transformers 5 silently drops the 3-D M-RoPE image positions), and
    read log_softmax over the full vocabulary at the positions just before each token.
    """
    import torch

    completion = torch.tensor(completion_ids)
    input_ids = torch.cat([inputs.input_ids[0], completion])[None]
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": inputs.pixel_values,
        "image_grid_thw": inputs.image_grid_thw,
    }
    if use_mm_token_type_ids:
        kwargs["mm_token_type_ids"] = torch.cat([inputs.mm_token_type_ids[0], torch.zeros_like(completion)])[None]
    prompt_len = inputs.input_ids.shape[1]
    with torch.no_grad():
        logits = model(**kwargs).logits[0, prompt_len - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, completion[:, None])[:, 0]


@pytest.mark.slow
def test_vllm_group_logprobs_match_hf(vllm_engine, hf_policy) -> None:
    import torch
    from vllm import SamplingParams

    processor, model = hf_policy
    text, image = _chat_text(processor), _image(112, 112)
    banned = set(processor.tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)))
    params = SamplingParams(
        n=4,
        temperature=1.0,
        max_tokens=16,
        logprobs=0,
        seed=0,
        # A random policy samples vision tokens, which the learner's forward then rejects.
        allowed_token_ids=[i for i in range(len(processor.tokenizer)) if i not in banned],
    )
    (request,) = vllm_engine.generate({"prompt": text, "multi_modal_data": {"image": image}}, params, use_tqdm=False)
    assert len(request.outputs) == 4
    for sample in request.outputs:
        assert len(sample.token_ids) > 0 and not banned.intersection(sample.token_ids)
        logprobs = [step[token].logprob for token, step in zip(sample.token_ids, sample.logprobs, strict=True)]
        assert all(math.isfinite(lp) and lp <= 0.0 for lp in logprobs)
        assert isinstance(sample.text, str)

    inputs = processor(text=[text], images=[image], return_tensors="pt")
    assert list(request.prompt_token_ids) == inputs.input_ids[0].tolist()  # same image-token expansion
    sample = request.outputs[0]
    vllm_lp = torch.tensor([step[t].logprob for t, step in zip(sample.token_ids, sample.logprobs)])
    hf_lp = hf_completion_logprobs(model, inputs, list(sample.token_ids))
    assert (hf_lp - vllm_lp).abs().max().item() < 1e-4
    # The tolerance is tight enough to catch the mm_token_type_ids pitfall (measured ~5e-3 off).
    hf_lp_1d = hf_completion_logprobs(model, inputs, list(sample.token_ids), use_mm_token_type_ids=False)
    assert (hf_lp_1d - vllm_lp).abs().max().item() > 1e-3


# --------------------------------------------------------------------------- SAM2


def test_load_sam2_predictor_names_a_missing_checkpoint(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_sam2_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", missing, 256)


def test_load_sam2_predictor_rejects_a_size_hiera_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size=272"):
        load_sam2_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", None, 272)


@pytest.fixture(scope="module")
def sam2_predictor(tiny_sam2: Sam2Checkpoint):
    return load_sam2_predictor(tiny_sam2.config, tiny_sam2.checkpoint, tiny_sam2.image_size)


@pytest.mark.slow
def test_sam2_box_prompt_gives_a_mask_of_the_image_size(sam2_predictor, tiny_sam2: Sam2Checkpoint) -> None:
    import torch

    image = np.asarray(_image(120, 160))
    sam2_predictor.set_image(image)
    size = tiny_sam2.image_size
    features = sam2_predictor._features
    assert features["image_embed"].shape == (1, 256, size // 16, size // 16)
    assert [f.shape[-1] for f in features["high_res_feats"]] == [size // 4, size // 8]
    embedding = features["image_embed"].clone()

    box = np.array([10, 20, 100, 90])
    masks, scores, _ = sam2_predictor.predict(box=box, multimask_output=False)
    assert masks.shape == (1, 120, 160)
    assert set(np.unique(masks)) <= {0.0, 1.0}
    assert np.isfinite(scores).all()

    sam2_predictor.set_image(image)  # same image again: same embedding, same mask
    assert torch.equal(sam2_predictor._features["image_embed"], embedding)
    again, _, _ = sam2_predictor.predict(box=box, multimask_output=False)
    assert np.array_equal(again, masks)


@pytest.mark.slow
def test_sam2_build_is_deterministic(tmp_path: Path, tiny_sam2: Sam2Checkpoint) -> None:
    import torch

    again = build_sam2(tmp_path, seed=0, image_size=tiny_sam2.image_size)
    assert again.checkpoint.parent.name == tiny_sam2.checkpoint.parent.name
    assert _sha256(again.checkpoint) == _sha256(tiny_sam2.checkpoint)
    state = torch.load(again.checkpoint, map_location="cpu", weights_only=True)  # SAM2's own loader's way
    assert set(state) == {"model"} and len(state["model"]) > 400


@pytest.mark.slow
def test_cli_prints_the_cached_paths(capsys: pytest.CaptureFixture[str], tiny_qwen_dir, tiny_sam2) -> None:
    assert main(["--cache-dir", str(tiny_qwen_dir.parent), "--seed", "0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["qwen"] == str(tiny_qwen_dir)
    assert printed["sam2"] == {
        "config": tiny_sam2.config,
        "checkpoint": str(tiny_sam2.checkpoint),
        "image_size": tiny_sam2.image_size,
    }
