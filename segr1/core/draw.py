"""Pictures of predictions: the image, the ground truth and the predicted mask with the model's prompts.

Used for the training job's sample dumps and the evaluation gallery, so both show the same thing.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

GT_COLOR = (0, 200, 0)
PRED_COLOR = (255, 40, 40)
BOX_COLOR = (255, 220, 0)
POSITIVE_COLOR = (0, 255, 255)
NEGATIVE_COLOR = (255, 0, 255)


def overlay(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int], alpha: float = 0.5) -> Image.Image:
    """``image`` with ``mask`` tinted in ``color``; the mask is resized (nearest) to the image."""
    base = Image.fromarray(image).convert("RGB")
    mask_img = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255, mode="L")
    if mask_img.size != base.size:
        mask_img = mask_img.resize(base.size, Image.NEAREST)
    tint = Image.new("RGB", base.size, color)
    return Image.composite(Image.blend(base, tint, alpha), base, mask_img)


def draw_prompts(
    picture: Image.Image,
    boxes: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
    policy_size: tuple[int, int],
) -> Image.Image:
    """Boxes and points drawn on ``picture``; coordinates are in the policy's ``(w, h)`` pixel space."""
    out = picture.copy()
    draw = ImageDraw.Draw(out)
    sx, sy = out.width / policy_size[0], out.height / policy_size[1]
    radius = max(2, round(min(out.size) / 80))
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=float).reshape(-1, 4):
        draw.rectangle([x1 * sx, y1 * sy, x2 * sx, y2 * sy], outline=BOX_COLOR, width=max(1, radius // 2))
    for (x, y), label in zip(np.asarray(points, dtype=float).reshape(-1, 2), np.asarray(labels).reshape(-1)):
        color = POSITIVE_COLOR if int(label) == 1 else NEGATIVE_COLOR
        draw.ellipse([x * sx - radius, y * sy - radius, x * sx + radius, y * sy + radius], fill=color)
    return out


def panel(
    image: np.ndarray,
    gt_mask: np.ndarray,
    pred_mask: np.ndarray,
    boxes: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
    policy_size: tuple[int, int],
) -> Image.Image:
    """Three pictures side by side: the input, the ground truth, the prediction with its prompts."""
    pictures = [
        Image.fromarray(image).convert("RGB"),
        overlay(image, gt_mask, GT_COLOR),
        draw_prompts(overlay(image, pred_mask, PRED_COLOR), boxes, points, labels, policy_size),
    ]
    width, height = pictures[0].size
    out = Image.new("RGB", (3 * width + 8, height), (255, 255, 255))
    for i, picture in enumerate(pictures):
        out.paste(picture, (i * (width + 4), 0))
    return out
