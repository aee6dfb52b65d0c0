"""The tokens the policy must never write (``segr1.core.vocab``), banned inside vLLM's sampler for every request.

``VisionTokenBan``, a vLLM logits processor (``LLM(logits_processors=[...])``), sets their logits
to -inf for every request of the engine. It runs before the temperature, and the engines return
the log-probs of what they sampled from (``logprobs_mode="processed_logprobs"``), so the learner
bans the same ids and divides by the same temperature (``learner.inputs.Sampled``). A request's
``allowed_token_ids`` did the same with the list of every other id: 151,000 integers sent with each
request and turned into a mask for it.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from segr1.core.vocab import vision_token_ids

VISION_TOKEN_BAN = f"{__name__}:VisionTokenBan"  # as vLLM's engine arguments name it (module:class)


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
