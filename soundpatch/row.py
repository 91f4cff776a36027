"""A row as it goes through the batch: checked, then its result in the making."""

from __future__ import annotations

from dataclasses import dataclass

from soundpatch.audio import Audio, AudioInfo, damaged_frames
from soundpatch.edits import Edit
from soundpatch.outcome import Outcome
from soundpatch.providers import Provider


@dataclass(frozen=True)
class Checked:
    """An edit that passed validation, with what validation learned about its source."""

    edit: Edit
    source: str
    info: AudioInfo
    provider: Provider


@dataclass
class RowWork:
    """A row's result in the making: the checked edit, its recording, the region's frames
    a..b, what the result is made for (identity, request, source) and the row's outcome."""

    checked: Checked
    original: Audio
    a: int
    b: int
    made_for: dict
    outcome: Outcome
    # What the model's answer is made for (identity.answer_identity), once known; and the run
    # that paid for the answer kept with the results it was made from (kept_answers.py).
    answer: str = ""
    answer_from: str = ""

    @property
    def edit(self) -> Edit:
        return self.checked.edit

    @property
    def damaged(self) -> tuple[tuple[int, int], ...]:
        """The frames of the edit's damaged spans, inside a..b (empty: all of the region)."""
        return damaged_frames(self.edit.damaged, self.original.rate, self.a, self.b)
