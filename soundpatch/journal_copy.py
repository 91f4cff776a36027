"""The journal's copy in the output bucket, so that a run resumes on another machine.

The journal (journal.py) lives on the machine that ran the run. A worker in a container,
or a machine that died, takes it along, and a retry of the run elsewhere would not know
which predictions were paid for: it would pay for them again and count none of them
against the budget. So when the outputs go to a bucket, each attempt at a row that
involves a paid prediction is copied there too, at the moments that matter to money: a
create about to go out, its prediction id, and the row's outcome (what it cost):

    <output.uri>/.soundpatch/runs/<run_id>/rows/<row>/<attempt>.jsonl   as the run goes
    <output.uri>/.soundpatch/runs/<run_id>/journal.jsonl                 once it ends

(the run's whole journal, which replaces the rows' copies). A machine with no journal for
the run id starts from this copy.

Money first: a create is not sent until the copy says it is about to be (`creating`); if
the bucket cannot take that, the row fails and nothing is sent. After money moved (the
prediction's id, the outcome) a copy that cannot be written does not stop the row: the
journal on this machine has it, and the run's notes say the copy is behind. Nothing else
is copied: an attempt that never reached a create spent nothing, and a paid answer kept
on this machine's disk (answers.py) is gone with it, so that row counts as in doubt.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from soundpatch.errors import RowError
from soundpatch.journal import BEFORE_MONEY, split_lines
from soundpatch.s3 import S3, S3Uri

RUNS_PREFIX = ".soundpatch/runs"  # beside the output index (storage.INDEX_PREFIX)
# An attempt is copied from the first of these on (money is involved: a create going out,
# a prediction paid for earlier being collected, a paid answer kept earlier being used) ...
PAID = ("creating", "created", "answer_kept")
# ... each time one of these is journaled.
COPIED = ("creating", "created", "outcome")
MAX_JOURNAL_BYTES = 1 << 30
log = logging.getLogger("soundpatch")


@dataclass
class _Attempt:
    """One row's events since its attempt began in this process."""

    key: S3Uri
    lines: list[str] = field(default_factory=list)
    paid: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class JournalCopy:
    def __init__(self, s3: S3, output: S3Uri, run_id: str) -> None:
        self.s3 = s3
        self.folder = output.child(f"{RUNS_PREFIX}/{run_id}/")
        # Orders this process's attempts after those of earlier processes of the run.
        self._stamp = f"{time.time_ns() // 1_000_000:015d}-{secrets.token_hex(4)}"
        self._attempts: dict[str, _Attempt] = {}
        self._lock = threading.Lock()
        self.missed = 0  # copies that could not be written after money moved
        self.first_miss = ""

    # ------------------------------------------------------------------ as the run goes

    def add(self, row: str, event: str, line: str) -> None:
        """Keep `line` (one journal event of `row`) with the row's attempt, and copy the
        attempt to the bucket when the event matters to money. Raises RowError when an
        event in BEFORE_MONEY cannot be copied."""
        with self._lock:
            if event == "sending":  # a new attempt at the row: its own object
                key = self.folder.child(f"rows/{quote(row, safe='')}/{self._stamp}.jsonl")
                self._attempts[row] = _Attempt(key)
            attempt = self._attempts.get(row)
            if event == "outcome":
                self._attempts.pop(row, None)  # the last copy of the attempt; memory stays flat
        if attempt is None:
            return  # nothing of this row went towards a provider in this process
        with attempt.lock:  # one row's copies land in the order they were made
            attempt.lines.append(line)
            attempt.paid = attempt.paid or event in PAID
            if not attempt.paid or event not in COPIED:
                return
            try:
                self.s3.write(attempt.key, "".join(attempt.lines).encode(), "application/x-ndjson")
            except RowError as exc:
                if event in BEFORE_MONEY:
                    attempt.lines.pop()
                    raise RowError(
                        f"The run's journal could not be copied to the bucket before the create, so nothing "
                        f"was sent ({exc})"
                    ) from None
                self._missed(exc)

    def _missed(self, exc: Exception) -> None:
        with self._lock:
            self.missed += 1
            if not self.first_miss:
                self.first_miss = str(exc)
                log.warning("The journal's copy in the bucket is behind: %s", exc)

    # ------------------------------------------------------------------ starting elsewhere

    def lines(self) -> list[str]:
        """The journal as the bucket has it: the whole journal of the last run that ended,
        then each row's attempts since, oldest first ([] if there is no copy)."""
        keys = self.s3.keys(self.folder)
        whole = self.folder.child("journal.jsonl")
        rows = sorted(k for k in keys if k.startswith(self.folder.child("rows/").key))
        names = ([whole] if whole.key in keys else []) + [S3Uri(self.folder.bucket, k) for k in rows]
        with ThreadPoolExecutor(max_workers=16) as pool:  # a request each
            texts = list(pool.map(lambda uri: self.s3.get(uri, MAX_JOURNAL_BYTES) or b"", names))
        out: list[str] = []
        for text in texts:
            out.extend(split_lines(text.decode("utf-8", errors="replace")))
        return out

    # ------------------------------------------------------------------ the end of a run

    def replace_with(self, journal: Path) -> None:
        """The run's whole journal in place of its rows' copies (which it includes)."""
        try:
            rows = self.s3.keys(self.folder.child("rows/"))
            self.s3.write(self.folder.child("journal.jsonl"), journal.read_bytes(), "application/x-ndjson")
        except (RowError, OSError) as exc:
            self._missed(exc)
            return
        self.s3.delete_keys(self.folder.bucket, rows)

    def note(self) -> str | None:
        if not self.missed:
            return None
        return (
            f"The journal's copy in the bucket could not be written {self.missed} time"
            f"{'s' if self.missed != 1 else ''} ({self.first_miss}); a rerun on this machine is not affected, "
            "but one on another machine may not know of every prediction this run paid for."
        )
