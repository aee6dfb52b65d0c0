"""Records to prompts: render each record's chat prompt and put its image and mask in the store once.

The driver owns one ``PromptSource`` over a ``ShardReader``; its position (the reader's state plus
how many prompts it has issued) is part of every checkpoint, so a resumed run sees the same records
in the same order as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from actors.pipeline import IssuedPrompt
from segr1.core.frames import processor_bounds
from segr1.core.prompts import TEXT_TASKS, PromptRenderer
from segr1.core.schema import PromptItem
from segr1.data import Record, ShardReader


class PromptSource:
    """Turns records into ``IssuedPrompt``s; ``put`` is ``ray.put`` in a job (identity in tests).

    ``processor`` must carry the image bounds the rollout engines use (``learner.inputs.
    load_processor``): each prompt's ``policy_size`` is the record's image as that processor
    resizes it, the frame the policy's answer is read in.
    """

    def __init__(
        self,
        reader: ShardReader,
        processor: Any,
        task: str | None = None,
        put: Callable[[Any], Any] = lambda value: value,
        prefix: str = "g",
    ) -> None:
        self.reader = reader
        self.processor = processor
        self.bounds = processor_bounds(processor)
        self.task = task
        self.put = put
        self.prefix = prefix
        self.issued = 0
        self._records: Iterator[Record] = iter(reader)
        self._render = PromptRenderer(processor)

    def next(self, count: int) -> list[IssuedPrompt]:
        """The next ``count`` prompts; raises StopIteration when a finite reader runs out."""
        return [self._issue(next(self._records)) for _ in range(count)]

    def state_dict(self) -> dict[str, Any]:
        return {"reader": self.reader.state_dict(), "issued": self.issued}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reader.load_state_dict(state["reader"])
        self.issued = int(state["issued"])
        self._records = iter(self.reader)

    def _issue(self, record: Record) -> IssuedPrompt:
        task = self.task or record.task
        expression = self._expression(record, task) if task in TEXT_TASKS else None
        item = PromptItem(
            group_id=f"{self.prefix}{self.issued}:{record.id}",
            record_id=record.id,
            prompt=self._render(task, expression),
            image=self.put(np.ascontiguousarray(record.image)),
            policy_size=self.bounds.frame((record.image.shape[1], record.image.shape[0])),
            task=task,
        )
        self.issued += 1
        return IssuedPrompt(item=item, mask=self.put(np.ascontiguousarray(record.mask)))

    def _expression(self, record: Record, task: str) -> str:
        """One of the record's expressions, chosen by the issue count so it is reproducible."""
        if not record.texts:
            raise ValueError(f"record {record.id!r} has no expression for task {task!r}")
        return record.texts[self.issued % len(record.texts)]
