"""Tiny random models for tests and the demo: a Qwen2.5-VL policy and a SAM2 segmenter.

Both are deterministic functions of a seed and are built once into a cache directory named
by a hash of everything that shapes them (settings, factory version, library versions).
A build happens in a temporary sibling directory that is renamed into place, so concurrent
builders (pytest-xdist workers, several Ray actors) never see half a directory: the loser of
the rename race throws its copy away and uses the winner's.

    python -m segr1.tiny [--cache-dir D] [--seed N] [--sam2-image-size N]

prints the paths as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from segr1.core.files import move_into_place

# Bump when a change in this file changes what is built, so old cache entries are not reused.
FACTORY_VERSION = "segr1-tiny-1"

SAM2_TINY_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
SAM2_CHECKPOINT_NAME = "sam2_tiny_random.pt"
# At 256 px hiera-tiny encodes an image in ~0.2 s on CPU (1024: ~2 s) and masks still have
# some spatial detail; any multiple of 32 from 64 up runs. The weights do not depend on it,
# so one checkpoint also loads at other sizes.
SAM2_DEFAULT_IMAGE_SIZE = 256

# Image processor bounds. Qwen resizes every image to multiples of 28 px with
# MIN_PIXELS <= h*w <= MAX_PIXELS. MAX_PIXELS = 224*224 caps an image at 64 image tokens, which
# keeps tests on 112..768 px images fast: 112x112 stays as is (16 tokens); 768x768 becomes
# 196x196 (49 tokens; smart_resize floors). Real runs set their own bounds on the real processor.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112 * 4

TOKENIZER_VOCAB_SIZE = 1024  # BPE vocab incl. the 256 byte symbols; 16 added tokens come on top

# Qwen2.5-VL's special tokens, in Qwen's order, so ids keep Qwen's relative layout.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Added but not special: decoding with skip_special_tokens=True must keep them for the parser.
THINK_TOKENS = ("<think>", "</think>")

TEXT_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    # transformers 5 form; mrope_section (temporal, height, width) must sum to head_dim / 2 = 16.
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
}
VISION_CONFIG = {
    "depth": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 2,
    "out_hidden_size": TEXT_CONFIG["hidden_size"],
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1],
    "tokens_per_second": 2,
    "in_channels": 3,
    "hidden_act": "silu",
}

# Qwen2.5-VL's layout. No whitespace-control dashes: the newlines are part of the format.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Random init draws from torch's global RNG; two threads seeding it at once would interleave.
_SEEDED_INIT = threading.Lock()


@dataclass(frozen=True)
class Sam2Checkpoint:
    """A SAM2 checkpoint: the config name inside the sam2 package, the weights, the input size."""

    config: str
    checkpoint: Path
    image_size: int


def default_cache_dir() -> Path:
    """Where tiny models live: $SEGR1_CACHE/tiny, else ~/.cache/segr1/tiny."""
    root = os.environ.get("SEGR1_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "segr1"
    return base / "tiny"


def _settings_hash(settings: dict) -> str:
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _build_once(cache_dir: Path | None, settings: dict, write: Callable[[Path], None]) -> Path:
    """Return cache_dir/<kind>-<hash>, running write(tmp_dir) and renaming it there if absent."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{settings['kind']}-{_settings_hash(settings)}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by the user's processes
    try:
        write(tmp)
        (tmp / "segr1_tiny.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
        move_into_place(tmp, final, replace=False)  # another process may have built it meanwhile
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- Qwen2.5-VL


def _qwen_settings(seed: int) -> dict:
    return {
        "kind": "qwen2_5_vl",
        "factory": FACTORY_VERSION,
        "seed": seed,
        "text": TEXT_CONFIG,
        "vision": VISION_CONFIG,
        "pixels": [MIN_PIXELS, MAX_PIXELS],
        "vocab": TOKENIZER_VOCAB_SIZE,
        "special": list(QWEN_SPECIAL_TOKENS + THINK_TOKENS),
        "chat_template": CHAT_TEMPLATE,
        "versions": {p: metadata.version(p) for p in ("torch", "transformers", "tokenizers")},
    }


def _train_tokenizer():
    """Byte-level BPE with Qwen2's pre-tokenizer, trained on the generated corpus."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    from segr1.testing.tokenizer_corpus import corpus_lines

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus_lines(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # Qwen2Tokenizer rebuilds the same pipeline from vocab + merges; using it means the saved
    # tokenizer loads exactly like a real Qwen2.5 one in transformers and vLLM.
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, errors="replace")
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tok.eos_token = "<|im_end|>"  # as in Qwen2.5-VL-Instruct: a chat turn ends generation
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _qwen_config(tok):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = dict(
        TEXT_CONFIG,
        vocab_size=len(tok),
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=VISION_CONFIG,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )


def _write_qwen(out: Path, seed: int) -> None:
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = _train_tokenizer()
    config = _qwen_config(tok)
    with _SEEDED_INIT, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    endoftext, im_end = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext
    )
    model.save_pretrained(out, safe_serialization=True)
    pixels = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)


def build_qwen(cache_dir: Path | None = None, seed: int = 0) -> Path:
    """A tiny random Qwen2.5-VL checkpoint directory (weights, tokenizer, processor, template).

    The tokenizer is the same for every seed (its corpus is fixed); the weights follow the seed.
    """
    return _build_once(cache_dir, _qwen_settings(seed), lambda out: _write_qwen(out, seed))


# --------------------------------------------------------------------------- the format-warm policy

WARM_QWEN = "tiny-warm"  # model.path of the tiny preset: the tiny policy after a short SFT
# A short SFT with random coordinates (the answer's format, nowhere in particular): about half the
# sampled answers parse, so GRPO's groups differ in reward from the first step and the default job
# has something to learn. On the tiny job's own kind of data (camouflage scenes, 112 px, its image
# bounds). About a minute on 2 cores.
WARM_SFT = {"records": 64, "image_size": 112, "steps": 400, "batch_size": 8, "lr": 1e-3}


def _warm_settings(seed: int) -> dict:
    return {"kind": "qwen-warm", "factory": FACTORY_VERSION, "base": _qwen_settings(seed), "seed": seed, **WARM_SFT}


def _write_warm_qwen(out: Path, base: Path, seed: int) -> None:
    """The project's own commands in child processes (``segr1 data synth``, then ``segr1 sft``
    with the tiny preset's settings), so the warm start is exactly what a user's SFT would make."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="segr1-warm-") as work:
        data, log = Path(work) / "data", out / "sft.log"
        commands = [
            ["-m", "segr1.data", "synth", "--out", str(data), "--count", str(WARM_SFT["records"]),
             "--size", str(WARM_SFT["image_size"]), "--seed", str(seed)],
            ["-m", "segr1.sft", "--config", "tiny", "--model", str(base), "--data", str(data),
             "--output", str(Path(work) / "checkpoints"), "--export", str(out / "model"), "--random-coords",
             "--steps", str(WARM_SFT["steps"]), "--batch-size", str(WARM_SFT["batch_size"]),
             "--lr", str(WARM_SFT["lr"]), "--seed", str(seed)],
        ]
        with open(log, "a") as handle:
            for command in commands:
                done = subprocess.run([sys.executable, *command], stdout=handle, stderr=subprocess.STDOUT)
                if done.returncode != 0:
                    raise RuntimeError(f"building {WARM_QWEN}: {' '.join(command[1:3])} failed; see {log}")


def build_warm_qwen(cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The tiny policy after ``WARM_SFT``: a Hugging Face directory, built once per seed."""
    base = build_qwen(cache_dir, seed)
    return _build_once(cache_dir, _warm_settings(seed), lambda out: _write_warm_qwen(out, base, seed)) / "model"


# --------------------------------------------------------------------------- SAM2


def _write_sam2(out: Path, seed: int, image_size: int) -> None:
    import torch
    from sam2.build_sam import build_sam2 as sam2_build

    with _SEEDED_INIT, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = sam2_build(
            SAM2_TINY_CONFIG, None, device="cpu", hydra_overrides_extra=[f"++model.image_size={image_size}"]
        )
    # SAM2's own format ({"model": state_dict}, read by sam2.build_sam._load_checkpoint with
    # weights_only=True), so the tiny checkpoint loads through the same path as a real one.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    torch.save({"model": state}, out / SAM2_CHECKPOINT_NAME)


def build_sam2(
    cache_dir: Path | None = None, seed: int = 0, image_size: int = SAM2_DEFAULT_IMAGE_SIZE
) -> Sam2Checkpoint:
    """A SAM2 hiera-tiny (sam2.1 config) with seeded random weights, run at image_size."""
    if image_size <= 0 or image_size % 32:
        raise ValueError(f"image_size={image_size}: SAM2 needs a positive multiple of 32")
    settings = {
        "kind": "sam2",
        "factory": FACTORY_VERSION,
        "seed": seed,
        "config": SAM2_TINY_CONFIG,
        "image_size": image_size,
        "versions": {p: metadata.version(p) for p in ("torch", "sam2")},
    }
    directory = _build_once(cache_dir, settings, lambda out: _write_sam2(out, seed, image_size))
    return Sam2Checkpoint(SAM2_TINY_CONFIG, directory / SAM2_CHECKPOINT_NAME, image_size)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segr1 tiny", description="Build the tiny Qwen2.5-VL and SAM2.")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help=f"folder of <kind>-<hash> builds (default: {default_cache_dir()})"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sam2-image-size", type=int, default=SAM2_DEFAULT_IMAGE_SIZE)
    parser.add_argument("--warm", action="store_true", help=f"also build {WARM_QWEN}, the format-warm policy")
    args = parser.parse_args(argv)
    qwen = build_qwen(args.cache_dir, args.seed)
    sam2 = build_sam2(args.cache_dir, args.seed, args.sam2_image_size)
    paths = {"qwen": str(qwen), "sam2": {**asdict(sam2), "checkpoint": str(sam2.checkpoint)}}
    if args.warm:
        paths[WARM_QWEN] = str(build_warm_qwen(args.cache_dir, args.seed))
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
