"""Load a SAM2 image predictor from a config name and a checkpoint, at any input size.

Real and tiny checkpoints load the same way. A reduced input size (``image_size``) is a Hydra
override of the config; SAM2ImagePredictor hard-codes the backbone feature sizes of a 1024 px
model, so they are recomputed here for the size actually built. sam2 is imported inside the
function: importing this module stays cheap for code that only passes the loader around.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sam2.sam2_image_predictor import SAM2ImagePredictor

# Strides of the three backbone levels the predictor keeps (Hiera with scalp=1 drops the 4th).
_FEATURE_STRIDES = (4, 8, 16)
# Hiera still computes its deepest stage (stride 32); other sizes fail inside the FPN neck.
SIZE_MULTIPLE = 32


def load_sam2_predictor(
    config: str,
    checkpoint: Path | str | None,
    image_size: int | None = None,
    device: str = "cpu",
) -> SAM2ImagePredictor:
    """Build SAM2 from `config` (a name inside the sam2 package), load `checkpoint`, wrap it.

    checkpoint=None leaves the weights at their random initialisation (only useful for tests);
    image_size=None keeps the config's own size (1024 for the released models).
    """
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"SAM2 checkpoint not found: {checkpoint}")
    if image_size is not None and (image_size <= 0 or image_size % SIZE_MULTIPLE):
        raise ValueError(f"image_size={image_size}: SAM2 needs a positive multiple of {SIZE_MULTIPLE}")

    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    overrides = [] if image_size is None else [f"++model.image_size={image_size}"]
    ckpt = None if checkpoint is None else str(checkpoint)
    model = build_sam2(config, ckpt, device=device, hydra_overrides_extra=overrides)
    predictor = SAM2ImagePredictor(model)
    size = model.image_size
    predictor._bb_feat_sizes = [(size // s, size // s) for s in _FEATURE_STRIDES]
    return predictor
