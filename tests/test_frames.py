"""The answer's frame at real sizes: 768 and 1024 px records under Qwen2.5-VL-3B's processor bounds
and under the bounds an export keeps, through the code the reward actors, SFT and evaluation run.

The tiny world (112 px records, 112² bounds) never resizes an image, so an answer read in the
stored image's frame looked right there; these sizes are where it is 1.6 % (768 -> 756) to 26 %
(1024 -> 756) off.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from actors.reward import RewardActor, RewardSettings
from learner.inputs import load_processor, process_prompt
from segr1.core.frames import PixelBounds, policy_frame, processor_bounds, processor_size, to_policy_frame
from segr1.core.metrics import intersection_union
from segr1.core.prompts import answer_text
from segr1.core.schema import Completion, PromptItem, RolloutGroup
from segr1.core.segment import BoxSegmenter
from segr1.data import Record
from segr1.evaluation.datasets import Example, Sample
from segr1.evaluation.scoring import local_predictor
from segr1.segmenters.settings import Sam2Settings
from segr1.train.prompt_source import PromptSource
from segr1.train.sft import answer_for_mask

QWEN_3B = (3136, 12845056)  # Qwen2.5-VL-3B-Instruct's preprocessor_config min/max pixels
EXPORT = (3136, 768 * 768)  # segr1's model.min_pixels/max_pixels default, which an export saves
CASES = [  # (stored side, bounds, the side the policy sees)
    (768, QWEN_3B, 756),
    (1024, QWEN_3B, 1036),
    (768, EXPORT, 756),
    (1024, EXPORT, 756),
]
IOU_MIN = 0.98


@pytest.mark.parametrize("size", [(768, 768), (1024, 1024), (1024, 768), (640, 480), (112, 112), (57, 3000),
                                  (4000, 3000), (30, 30), (1920, 1080)])
@pytest.mark.parametrize("bounds", [QWEN_3B, EXPORT, (3136, 12544), (56 * 56, 56 * 56)])
def test_policy_frame_is_the_processors_own_rule(size, bounds):
    height, width = smart_resize(size[1], size[0], 28, *bounds)
    assert policy_frame(size, PixelBounds(*bounds)) == (width, height)


@pytest.mark.parametrize(("side", "bounds", "seen"), CASES)
def test_the_processor_resizes_to_the_frame(tiny_qwen_dir, side, bounds, seen):
    """The real processor, loaded as the job loads it, resizes to the frame segr1 computes."""
    processor = load_processor(str(tiny_qwen_dir), *bounds)
    frame = processor_bounds(processor).frame((side, side))
    assert frame == (seen, seen)
    image = np.zeros((side, side, 3), np.uint8)
    inputs = process_prompt(processor, "<|vision_start|><|image_pad|><|vision_end|>", image, "g")
    _, grid_h, grid_w = inputs.image_grid_thw.reshape(-1).tolist()
    assert (grid_w * 14, grid_h * 14) == frame


def test_processor_size_holds_both_bounds_and_reads_the_checkpoint_only_for_a_missing_one():
    def checkpoint():
        read.append(True)
        return PixelBounds(3136, 50176)

    read: list[bool] = []
    assert processor_size(None, None, checkpoint) is None
    assert processor_size(3136, 12544, checkpoint) == {"shortest_edge": 3136, "longest_edge": 12544}
    assert read == []
    assert processor_size(None, 12544, checkpoint) == {"shortest_edge": 3136, "longest_edge": 12544}
    assert processor_size(6272, None, checkpoint) == {"shortest_edge": 6272, "longest_edge": 50176}
    with pytest.raises(ValueError, match=r"0 < min_pixels <= max_pixels, got 100000, 50176"):
        processor_size(100_000, None, checkpoint)


@pytest.mark.parametrize("bounds", [(3136, 12544), (None, 12544), (None, None)])
def test_the_processor_loaded_with_bounds_warns_nothing_when_it_runs(tiny_qwen_dir, bounds):
    """The bounds go in as ``size``: passed as min_pixels/max_pixels they reached every processor
    call, and transformers 5 warned (FutureWarning) at each one of every step."""
    processor = load_processor(str(tiny_qwen_dir), *bounds)
    image = np.zeros((768, 768, 3), np.uint8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inputs = process_prompt(processor, "<|vision_start|><|image_pad|><|vision_end|>", image, "g")
    assert [str(w.message) for w in caught] == []
    own = processor_bounds(load_processor(str(tiny_qwen_dir)))
    low, high = (own.min_pixels if bounds[0] is None else bounds[0]), (own.max_pixels if bounds[1] is None else bounds[1])
    assert processor_bounds(processor) == PixelBounds(low, high)
    _, grid_h, grid_w = inputs.image_grid_thw.reshape(-1).tolist()
    assert (grid_w * 14, grid_h * 14) == PixelBounds(low, high).frame((768, 768))


def _record(side: int, box: tuple[int, int, int, int]) -> Record:
    """A rectangle object: its true box, decoded as a box, is exactly its mask."""
    x1, y1, x2, y2 = box
    mask = np.zeros((side, side), bool)
    mask[y1 : y2 + 1, x1 : x2 + 1] = True
    image = np.where(mask[..., None], 220, 40).astype(np.uint8).repeat(3, axis=2)
    return Record(id=f"rect-{side}", source="test", task="cod", image=image, mask=mask)


def _reward_iou(record: Record, item, text: str) -> float:
    actor = RewardActor(Sam2Settings(backend="box", box_point_radius=1.0), RewardSettings(), device="cpu")
    group = RolloutGroup(item, [0], [Completion([0], text, [0.0], "stop")], weight_version=0)
    return actor.score_group(group, record.mask)[0].parts["iou"]


@pytest.mark.parametrize(("side", "bounds", "seen"), CASES)
def test_the_true_box_in_the_policys_frame_scores_iou_1(tiny_qwen_dir, side, bounds, seen):
    """Training path: PromptSource sets the frame, the reward actor reads the answer in it."""
    box = (side // 2 - 40, side // 3, side - 60, side - 100)  # far from the origin: scale errors show
    record = _record(side, box)
    processor = load_processor(str(tiny_qwen_dir), *bounds)
    item = PromptSource([record], processor).next(1)[0].item  # a list stands in for the shard reader
    assert item.policy_size == (seen, seen)
    mapped = to_policy_frame(np.array(box, float), (side, side), item.policy_size)
    mapped[2:] += seen / side  # the box's far edge: the last pixel's end, not its start
    iou = _reward_iou(record, item, answer_text(boxes=[mapped], points=[], labels=[], think="t", decimals=1))
    assert iou >= IOU_MIN
    # The stored image's frame, which the answer used to be read in, misses at these sizes.
    stale = dataclasses.replace(item, policy_size=(side, side))
    assert _reward_iou(record, stale, answer_text(boxes=[mapped], points=[], labels=[], think="t")) < IOU_MIN


@pytest.mark.parametrize(("side", "bounds", "seen"), CASES)
def test_sft_answers_are_written_in_the_policys_frame(tiny_qwen_dir, side, bounds, seen):
    record = _record(side, (side // 2 - 40, side // 3, side - 60, side - 100))
    frame = processor_bounds(load_processor(str(tiny_qwen_dir), *bounds)).frame((side, side))
    text = answer_for_mask(record.mask, "cod", np.random.default_rng(0), frame)
    prompt = PromptItem("g", record.id, "p", record.image, frame, "cod")
    assert _reward_iou(record, prompt, text) >= 0.97  # whole-pixel answers: half a policy pixel per edge


@pytest.mark.parametrize(("side", "bounds", "seen"), CASES)
def test_evaluation_reads_answers_in_the_processors_frame_of_the_square(side, bounds, seen):
    """Evaluation path: the square input (the paper's 768/1024) is resized by the processor again."""
    record = _record(1000, (430, 333, 900, 880))  # a stored image of another size than the square
    frame = PixelBounds(*bounds).frame((side, side))
    assert frame == (seen, seen)

    def complete(example: Example, square: np.ndarray) -> str:
        assert square.shape[:2] == (side, side)
        box = to_policy_frame(np.array([430, 333, 901, 881], float), (1000, 1000), frame)
        return answer_text(boxes=[box], points=[], labels=[], think="t", decimals=1)

    example = Example(id=record.id, task="cod", expression=None, source=_Loaded(Sample(record.image, record.mask)))
    predictor = local_predictor(complete, BoxSegmenter(point_radius=1.0), bounds=PixelBounds(*bounds))
    ((_, sample, prediction),) = list(predictor("cod", side, iter([example])))
    assert prediction.policy_size == frame
    inter, union = intersection_union(prediction.mask, sample.gt)
    assert inter / union >= IOU_MIN


class _Loaded:
    def __init__(self, sample: Sample) -> None:
        self.sample = sample

    def load(self) -> Sample:
        return self.sample


def test_the_policys_frame_keeps_the_aspect_ratio():
    """A non-square record: each axis has its own scale, never one for both."""
    bounds = PixelBounds(*QWEN_3B)
    assert policy_frame((1024, 768), bounds) == (1036, 756)
    image = Image.new("RGB", (1024, 768))
    assert bounds.frame(image.size) == (1036, 756)
    xy = to_policy_frame(np.array([1024.0, 768.0]), (1024, 768), (1036, 756))
    assert xy.tolist() == [1036.0, 756.0]
