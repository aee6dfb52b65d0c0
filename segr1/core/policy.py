"""The policy every role loads: where its weights are, their dtype, and its processor's image bounds.

One object (the job's ``model`` section) given to the rollout engines, the learner, evaluation and
SFT alike, so the engines and the learner can never resize an image differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ModelSettings:
    """``path``: a Hugging Face directory, a hub id, ``tiny`` (the tiny random Qwen2.5-VL that
    ``segr1.testing.tiny`` builds with ``seed``) or ``tiny-warm`` (that policy after a short
    format-teaching SFT, built once the same way). ``min_pixels``/``max_pixels`` bound the image as
    the processor resizes it (null keeps the checkpoint's own); the policy answers in that frame."""

    path: str = "tiny"
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    min_pixels: int | None = 3136
    max_pixels: int | None = 768 * 768
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} is larger than max_pixels {self.max_pixels}")

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"
