"""Which segmenter turns prompts into masks: the job's ``sam2`` section, read by every role that
segments (reward actors, evaluation, serving)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from segr1.segmenters.sam2_model import SIZE_MULTIPLE

TINY_CHECKPOINT = "tiny"  # a random-weight SAM2 built by segr1.testing.tiny (tests and the demo)


@dataclass(frozen=True)
class Sam2Settings:
    """``backend: box`` fills boxes and point discs instead (``point_radius`` pixels; a fast
    stand-in for tests). ``image_size`` null keeps the config's own input size (1024)."""

    backend: Literal["sam2", "box"] = "sam2"
    config: str = "configs/sam2.1/sam2.1_hiera_l.yaml"
    checkpoint: str = "checkpoints/sam2.1_hiera_large.pt"
    image_size: int | None = None
    box_point_radius: float = 4.0

    def __post_init__(self) -> None:
        if self.backend not in ("sam2", "box"):
            raise ValueError(f"backend must be 'sam2' or 'box', got {self.backend!r}")
        if self.image_size is not None and (self.image_size <= 0 or self.image_size % SIZE_MULTIPLE):
            raise ValueError(f"image_size must be a positive multiple of {SIZE_MULTIPLE}, got {self.image_size}")
        if not self.box_point_radius >= 0:
            raise ValueError(f"box_point_radius must be >= 0, got {self.box_point_radius}")
