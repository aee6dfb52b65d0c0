"""A small generated corpus for training the tiny model's BPE tokenizer.

The tiny Qwen2.5-VL used by tests and the demo needs a tokenizer that splits the text the
system actually sees (English instructions, chat scaffolding and Seg-R1 answers full of
digits, brackets and commas) into a realistic number of tokens, without shipping Qwen's
151k-entry vocabulary. The corpus is generated from a seeded RNG so the tokenizer, and
with it every token id, is the same on every machine.
"""

from __future__ import annotations

import random

_OBJECTS = (
    "camouflaged animal", "salient object", "frog", "owl", "insect", "fish", "crab", "lizard",
    "bird", "moth", "snake", "leaf", "dog", "cat", "person", "car", "cup", "chair", "flower",
    "butterfly", "spider", "octopus", "rabbit", "deer", "shadow", "building", "tree",
)

_INSTRUCTIONS = (
    "Please find the {obj} in the image.",
    "Find the {obj} hidden in the picture and segment it.",
    "Segment the {obj} in this image.",
    "Where is the {obj}? Give a bounding box and points.",
    "Locate the most salient object in the image.",
    "Identify the {obj} that blends into the background.",
    "Output the thinking process in <think> </think> and the final answer.",
    "Give the bounding box in <bbox></bbox>, the points in <points></points> "
    "and their labels in <labels></labels>.",
    "Use 1 for a positive point on the object and 0 for a negative point on the background.",
    "Coordinates are pixels of the image, x first, then y.",
)

_THOUGHTS = (
    "The {obj} is near the {where} of the image.",
    "I can see the {obj} at the {where}; its colour is close to the background.",
    "The texture of the {obj} differs slightly from the surroundings at the {where}.",
    "There is one {obj}. I will put a box around it and two points inside.",
    "The object is small, so a tight box is better.",
    "Let me look at the edges and the shape first.",
)

_WHERE = ("center", "left", "right", "top", "bottom", "top left", "bottom right", "middle")

_WORDS = (
    "the a an of in on at to from with without and or but not is are was were be been this that "
    "these those it its there here what which who where when why how all any each every some many "
    "few more most other such only same so than too very can will would should could may might must "
    "image picture photo scene region area part object objects background foreground edge edges "
    "boundary shape size colour color texture pattern light dark bright green brown grey gray white "
    "black red blue yellow orange pink small large big tiny long short wide narrow round thin thick "
    "left right top bottom center middle above below near far inside outside behind front between "
    "find locate segment mask box point points label labels answer think reason output give show "
    "first second third then next finally because therefore however also again still just "
    "water sand rock grass branch bark stone sky cloud ground wall floor road field forest river sea "
    "animal head body tail wing wings eye eyes leg legs fur skin scales feathers hidden visible"
).split()

_CHAT = (
    "system", "user", "assistant", "You are a helpful assistant.",
    "The image shows a natural scene.", "Answer with the format below.",
    "Sure, here is the answer.", "The quick brown fox jumps over the lazy dog.",
)


def _box(rng: random.Random, size: int) -> list[int]:
    x1, x2 = sorted(rng.sample(range(size), 2))
    y1, y2 = sorted(rng.sample(range(size), 2))
    return [x1, y1, x2, y2]


def seg_r1_answer(rng: random.Random, size: int = 768) -> str:
    """One Seg-R1 style completion: think, box(es), points and labels, in the paper's layout."""
    obj = rng.choice(_OBJECTS)
    thought = rng.choice(_THOUGHTS).format(obj=obj, where=rng.choice(_WHERE))
    n_points = rng.randint(1, 4)
    points = [[rng.randrange(size), rng.randrange(size)] for _ in range(n_points)]
    labels = [rng.randint(0, 1) for _ in range(n_points)]
    boxes = ", ".join(
        f"<bbox>{_compact(_box(rng, size))}</bbox>" for _ in range(rng.choice((1, 1, 1, 2)))
    )
    return (
        f"<think>{thought}</think> {boxes}, "
        f"<points>{_compact(points)}</points>, <labels>{_compact(labels)}</labels>"
    )


def _compact(value: object) -> str:
    """JSON-like list text without spaces, as Seg-R1 writes it: [[40,50],[60,70]]."""
    return str(value).replace(" ", "")


def corpus_lines(seed: int = 0, n_answers: int = 600) -> list[str]:
    """The training corpus: instructions, chat words, Seg-R1 answers and plain numbers."""
    rng = random.Random(seed)
    lines = list(_CHAT)
    lines += [t.format(obj=obj) for t in _INSTRUCTIONS for obj in _OBJECTS]
    lines += [seg_r1_answer(rng, size=rng.choice((112, 224, 448, 768, 1024))) for _ in range(n_answers)]
    lines += [" ".join(str(rng.randrange(1024)) for _ in range(16)) for _ in range(50)]
    lines += [" ".join(rng.choices(_WORDS, k=12)).capitalize() + "." for _ in range(300)]
    return lines
