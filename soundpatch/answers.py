"""Paid answers kept on disk until their row's outcome is recorded: runs/<run_id>/answers/.

A hosted provider's answer is paid for the moment it arrives; decoding it, splicing it,
encoding and uploading the result take a while after that (seconds, for a long file going
to a bucket). A run that dies in that time used to lose the result, and for Stability AI
(no prediction id to collect again) the row could only be counted as spent. So the answer
is written here first, made durable, and journaled ("answer_kept"); the next attempt of
the run finishes the row from it without sending anything. Once the row's outcome is in
the journal the file is removed, so the folder holds at most the rows in flight, and the
rows that failed using their answer: those keep it for the next attempt (journal.py,
"kept_paid"), which tries it again rather than paying for another.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from soundpatch.providers.base import PaidAnswer

ANSWERS_DIR = "answers"


class AnswerShelf:
    def __init__(self, run_dir: Path) -> None:
        self.folder = run_dir / ANSWERS_DIR

    def file_for(self, row_id: str) -> Path:
        # Row ids are users' text: the file is named by a digest of it.
        return self.folder / (hashlib.sha256(row_id.encode()).hexdigest()[:32] + ".answer")

    def keep(self, row_id: str, answer: PaidAnswer) -> dict[str, Any]:
        """Write the answer durably (a crash leaves either no file or the whole one); what
        the journal records of it. Raises OSError if the disk will not take it."""
        path = self.file_for(row_id)
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        with open(partial, "wb") as f:
            f.write(answer.data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
        folder = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself survives a power loss
        finally:
            os.close(folder)
        return {"file": path.name, "cost_usd": answer.cost_usd, "prediction_id": answer.prediction_id}

    def load(self, record: dict[str, Any] | None) -> PaidAnswer | None:
        """The kept answer a journal record names, if its file is still whole."""
        if not record or not record.get("file"):
            return None
        try:
            data = (self.folder / Path(str(record["file"])).name).read_bytes()
        except OSError:
            return None
        return PaidAnswer(data, float(record.get("cost_usd") or 0.0), record.get("prediction_id"))

    def record(self, row_id: str, cost_usd: float, prediction_id: str | None) -> dict[str, Any] | None:
        """What the journal records of the row's kept answer (as `keep` returns it), if one is kept."""
        path = self.file_for(row_id)
        if not path.is_file():
            return None
        return {"file": path.name, "cost_usd": cost_usd, "prediction_id": prediction_id}

    def exists(self, record: dict[str, Any] | None) -> bool:
        return bool(record and record.get("file")) and (self.folder / Path(str(record["file"])).name).is_file()

    def discard(self, row_id: str) -> None:
        self.file_for(row_id).unlink(missing_ok=True)
