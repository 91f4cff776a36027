"""Hosted models' paid answers for rows with damaged spans, kept with the results:
<output.uri>/.soundpatch/answers/.

For a row with damaged spans the model still makes the whole region, and only the spans
(and their crossfades) of it go into the result: the rest of what was paid for is not in
any file. A restorer who hears a span missed, widens one or changes the crossfade asks for
another result from the very same prediction (identity.sent_identity). So once such a row's
result is published, the model's answer is kept here, named by what it was made for
(identity.answer_identity); a later row asking for the same answer (any run, any machine
writing the same outputs) is spliced from it at no new cost instead of being sent again.

Rows of one manifest may ask for the same answer too (spans compared side by side, a row
with spans beside the row without): they are made one after another (batch.py), the first
keeps its answer whatever its spans, and the others are spliced from it (`asked_again`).

One file an answer: a line of JSON (the provider, its prediction id, what it cost, the run
that paid for it), then the answer's bytes as the provider gave them. No key or secret is
in it. An answer is offered to a row once: should it not be usable, the row pays for its own
(and keeps that, for the rows after).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from soundpatch.edits import Edit
from soundpatch.errors import SoundpatchError
from soundpatch.humanize import named_runs, plural
from soundpatch.identity import sent_identity
from soundpatch.leftovers import Left, Leftovers
from soundpatch.providers.base import PaidAnswer
from soundpatch.storage import OutputStore

ANSWERS_PREFIX = ".soundpatch/answers"  # user names cannot start with "." (storage.output_name)
RECORD_BYTES = 4096  # the most its first line takes
CONTENT_TYPE = "application/octet-stream"


class KeptAnswers(Leftovers):
    """Paid answers in the output store, by answer identity, each offered to a row once."""

    def __init__(self, store: OutputStore, run_id: str, max_bytes: int, asked_again: set[str] | None = None) -> None:
        """`asked_again`: the rows whose answer another row of this run asks for (`asked_again`)."""
        super().__init__()
        self.store = store
        self.run_id = run_id
        self.max_bytes = max_bytes  # the most an answer may weigh (a provider's download limit)
        self.asked_again = asked_again or set()
        self._offered: set[tuple[str, str]] = set()  # (answer identity, row id)
        self._listed: set[str] | None = None  # the answers' file names, for `holds` (listed once)

    def wanted(self, row_id: str, spans_partial: bool) -> bool:
        """Whether the model's answer a row was made from is to be kept: where its result holds
        only some of it (its damaged spans'), or another row of this run asks for it."""
        return spans_partial or row_id in self.asked_again

    def _name(self, answer: str) -> str:
        return f"{ANSWERS_PREFIX}/{answer}.answer"

    def find(self, answer: str, row_id: str) -> Left | None:
        """The answer kept for `answer`, as another run's prediction for row `row_id` to collect
        (once); None if there is none, or it cannot be read (the row then pays for its own)."""
        with self._lock:
            if (answer, row_id) in self._offered:
                return None
            self._offered.add((answer, row_id))
        try:
            found = self.store.read_file(self._name(answer), self.max_bytes + RECORD_BYTES)
        except (SoundpatchError, OSError):
            return None
        if found is None:
            return None
        head, newline, data = found[0].partition(b"\n")
        try:
            record = json.loads(head) if newline else None
        except ValueError:
            record = None
        if not isinstance(record, dict) or not data:
            return None  # not one of ours, or cut short
        prediction_id = str(record.get("prediction_id") or "")
        paid = PaidAnswer(data, float(record.get("cost_usd") or 0.0), prediction_id or None)
        return Left(
            run=str(record.get("run") or ""),
            prediction_id=prediction_id,
            provider=str(record.get("provider") or ""),
            answer={"file": self._name(answer)},
            paid=paid,
        )

    def holds(self, answer: str) -> bool:
        """Whether an answer is kept for `answer`, as the answers were when first asked (for an
        estimate, of every row at once: one listing, not a request a row; nothing is read)."""
        with self._lock:
            if self._listed is None:
                try:
                    self._listed = self.store.names(ANSWERS_PREFIX)
                except (SoundpatchError, OSError):
                    self._listed = set()  # (none to be had: the estimate errs on the side of cost)
            return f"{answer}.answer" in self._listed

    def keep(self, answer: str, provider: str, paid: PaidAnswer) -> None:
        """Keep a paid answer under `answer` (written whole, or not at all). Raises
        SoundpatchError or OSError if the store will not take it."""
        record: dict[str, Any] = {
            "provider": provider,
            "prediction_id": paid.prediction_id or "",
            "cost_usd": paid.cost_usd,
            "run": self.run_id,
            "kept_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        head = json.dumps(record, sort_keys=True).encode()
        self.store.put_file(self._name(answer), head + b"\n" + paid.data, CONTENT_TYPE)

    def paid_by(self, runs: dict[str, int]) -> str:
        """`run night-1`, `this run`, `this run and run night-1`: who paid for answers used."""
        others = {run: n for run, n in runs.items() if run != self.run_id}
        named = [*(["this run"] if self.run_id in runs else []), *([named_runs(others)] if others else [])]
        return " and ".join(named)

    def note(self) -> str:
        parts = []
        if self.collected:
            count = sum(self.collected.values())
            parts.append(
                f"{count} {'result was' if count == 1 else 'results were'} spliced again from the model's answer "
                f"{self.paid_by(self.collected)} paid for and kept with the results (only the damaged spans or the "
                "crossfade changed), at no new cost here."
            )
        if self.uncollectable:
            count = sum(self.uncollectable.values())
            parts.append(
                f"{plural(count, 'answer')} kept with the results could not be used, so "
                f"{'its row was' if count == 1 else 'their rows were'} paid for here."
            )
        return " ".join(parts)


def asked_again(edits: Sequence[Edit], input_of: Callable[[Edit], str], provider_of: Callable[[Edit], str]) -> set[str]:
    """The rows that send what another row sends, with other damaged spans: same recording
    (named the same), request without spans (identity.sent_identity) and provider. A model
    makes their answer once; each of them keeps it for the others."""
    groups: dict[tuple[str, str], list[Edit]] = {}
    for edit in edits:
        if edit.error:
            continue
        groups.setdefault((sent_identity(edit, input_of(edit)), provider_of(edit)), []).append(edit)
    return {
        edit.row_id
        for group in groups.values()
        if len({edit.damaged for edit in group}) > 1  # (identical rows are sent once anyway)
        for edit in group
    }
