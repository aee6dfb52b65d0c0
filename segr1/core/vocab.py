"""The tokens a policy must never write: Qwen2.5-VL's vision markup and the ids with no text.

Qwen2.5-VL's processor puts ``<|vision_start|>``, ``<|image_pad|>`` ... around an image; a sampled
one makes the learner's forward fail (image features and image tokens no longer match). Ids past
the tokenizer's length (the embedding is padded to a multiple of 64 or 128) have no text and were
never trained. The engines ban both inside their sampler (``actors.vision_ban``), so the learner
removes the same ids from the distribution whose log-probs it trains (``learner.inputs.Sampled``).
"""

from __future__ import annotations

from typing import Any

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
VISION_CONFIG_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def vision_token_ids(tokenizer: Any, hf_config: Any) -> set[int]:
    """Ids of the vision markup tokens, from the tokenizer's vocabulary and the model config."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in VISION_TOKENS if t in vocab}
    ids |= {int(v) for k in VISION_CONFIG_IDS if (v := getattr(hf_config, k, None)) is not None}
    return ids
