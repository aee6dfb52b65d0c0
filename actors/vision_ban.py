"""The tokens the policy must never write, banned inside vLLM's sampler for every request.

Qwen2.5-VL's processor puts ``<|vision_start|>``, ``<|image_pad|>`` ... around an image; a sampled
one makes the learner's forward fail (image features and image tokens no longer match). Ids past
the tokenizer's length (the embedding is padded to a multiple of 64 or 128) have no text and were
never trained. ``VisionTokenBan``, a vLLM logits processor (``LLM(logits_processors=[...])``), sets
their logits to -inf for every request of the engine. It runs after vLLM takes the raw log-probs,
so those stay the whole-vocabulary ones the learner computes. A request's ``allowed_token_ids``
did the same with the list of every other id: 151,000 integers sent with each request and turned
into a mask for it.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

# Qwen2.5-VL's vision markup: the processor inserts these, the policy must never write them.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
VISION_CONFIG_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
VISION_TOKEN_BAN = f"{__name__}:VisionTokenBan"  # as vLLM's engine arguments name it (module:class)


def vision_token_ids(tokenizer: Any, hf_config: Any) -> set[int]:
    """Ids of the vision markup tokens, from the tokenizer's vocabulary and the model config."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in VISION_TOKENS if t in vocab}
    ids |= {int(v) for k in VISION_CONFIG_IDS if (v := getattr(hf_config, k, None)) is not None}
    return ids


class VisionTokenBan(LogitsProcessor):
    """-inf on the vision markup and on the ids past the tokenizer's length, in every row."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        from vllm.tokenizers import cached_tokenizer_from_config

        model = vllm_config.model_config
        tokenizer = cached_tokenizer_from_config(model)  # the engine's own, as its settings say to load it
        self.text_vocab = len(tokenizer)
        self.banned = torch.tensor(sorted(vision_token_ids(tokenizer, model.hf_config)), dtype=torch.long,
                                   device=device)

    def is_argmax_invariant(self) -> bool:
        return False  # greedy answers must not write the markup either

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        return None  # the same ban for every request: nothing to track

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        logits.index_fill_(1, self.banned, float("-inf"))
        logits[:, self.text_vocab :] = float("-inf")
        return logits
