from __future__ import annotations

import numpy as np
import pytest

from segr1.core.parser import PRERL_FORMAT, RL_FORMAT, parse_completion
from segr1.core.prompts import SYSTEM_PROMPT, TASKS, answer_format, answer_text, build_messages, render_prompt


def _user_text(messages: list[dict]) -> str:
    user = messages[-1]
    assert user["role"] == "user"
    assert [part["type"] for part in user["content"]] == ["image", "text"]
    return user["content"][1]["text"]


@pytest.mark.parametrize("task", TASKS)
def test_every_task_has_one_image_the_system_prompt_and_a_format_example(task: str):
    expression = "the dog on the left" if task in ("refer", "reason") else None
    messages = build_messages(task, expression)
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}
    text = _user_text(messages)
    assert "<points>[[x1,y1],[x2,y2],[x3,y3]]</points>, <labels>[1,1,0]</labels>" in text
    rl = answer_format(task) == RL_FORMAT
    assert ("<think>" in text) == rl
    assert ("<bbox>[x1,y1,x2,y2]</bbox>" in text) == rl


def test_task_specific_requests():
    assert _user_text(build_messages("refer", "  the red car ")).startswith("Identify and segment the red car.\n")
    assert "Request: what keeps the rain off?" in _user_text(build_messages("reason", "what keeps the rain off?"))
    assert "camouflaged" in _user_text(build_messages("cod"))
    assert "salient" in _user_text(build_messages("sod"))
    assert build_messages("dis") == build_messages("prerl")
    assert answer_format("dis") == PRERL_FORMAT and answer_format("cod") == RL_FORMAT


def test_bad_task_or_expression_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown task 'cods'"):
        build_messages("cods")
    with pytest.raises(ValueError, match="'refer' needs a non-empty expression"):
        build_messages("refer", " ")
    with pytest.raises(ValueError, match="'cod' takes no expression"):
        build_messages("cod", "a frog")


def test_answer_text_is_the_canonical_format_the_parser_reads():
    text = answer_text([[10.4, 20, 30, 40.6]], [[12, 22], [5.5, 6]], [1, 0], think="a frog")
    assert text == (
        "<think>a frog</think> <bbox>[10,20,30,41]</bbox>, <points>[[12,22],[6,6]]</points>, <labels>[1,0]</labels>"
    )
    ps = parse_completion(text, (64, 64))
    assert ps.complete(RL_FORMAT)
    np.testing.assert_array_equal(ps.boxes, [[10, 20, 30, 41]])
    prerl = answer_text(None, [[1.25, 2]], [1], decimals=1)
    assert prerl == "<points>[[1.2,2.0]]</points>, <labels>[1]</labels>"
    two_boxes = answer_text([[0, 0, 1, 1], [2, 2, 3, 3]], [], [])
    assert two_boxes.startswith("<bbox>[0,0,1,1]</bbox><bbox>[2,2,3,3]</bbox>, ")


def test_answer_text_refuses_inconsistent_input():
    with pytest.raises(ValueError, match="2 points but 1 labels"):
        answer_text(None, [[1, 2], [3, 4]], [1])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        answer_text(None, [[1, 2]], [2])


@pytest.mark.slow
def test_render_prompt_with_the_tiny_qwen_processor():
    from transformers import AutoProcessor

    from segr1.testing.tiny import build_qwen

    processor = AutoProcessor.from_pretrained(build_qwen())
    text = render_prompt(processor, build_messages("refer", "the red car"))
    assert text.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
    assert text.count("<|image_pad|>") == 1
    assert "<|vision_end|>Identify and segment the red car.\n" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_prompt_source_asks_each_record_as_its_own_task_unless_told():
    from transformers import AutoProcessor

    from segr1.data import Record
    from segr1.testing.tiny import build_qwen
    from segr1.train.prompt_source import PromptSource

    processor = AutoProcessor.from_pretrained(build_qwen())
    image, mask = np.zeros((28, 28, 3), np.uint8), np.ones((28, 28), bool)
    records = [Record(id=f"r{i}", source="s", task=task, image=image, mask=mask) for i, task in enumerate(["sod", "cod"])]
    own = PromptSource(iter(records), processor).next(2)
    assert [p.item.task for p in own] == ["sod", "cod"]
    assert "most salient object" in own[0].item.prompt and "camouflaged" in own[1].item.prompt
    forced = PromptSource(iter(records), processor, task="cod").next(2)
    assert [p.item.task for p in forced] == ["cod", "cod"]
    assert forced[0].item.prompt == own[1].item.prompt
    refer = Record(id="x", source="s", task="cod", image=image, mask=mask)
    with pytest.raises(ValueError, match="record 'x' has no expression for task 'refer'"):
        PromptSource(iter([refer]), processor, task="refer").next(1)
