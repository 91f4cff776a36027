"""The run's journal: an append-only log of what happened to each row, in runs/<run_id>/.

Each line is one JSON event, written and flushed before the step it records is taken,
so a later run with the same id knows what is already done. The progress display reads
the same file, which is why it works whether rows run in this process or elsewhere.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from soundpatch.disk_room import full_disk
from soundpatch.errors import SoundpatchError

if TYPE_CHECKING:  # the copy needs boto3, which the progress display need not load
    from soundpatch.journal_copy import JournalCopy

JOURNAL_FILE = "journal.jsonl"
# Events that protect money or results: on disk before the step they announce, even if
# the machine loses power (a create about to go out, a prediction id, a paid answer kept,
# an outcome).
DURABLE_EVENTS = ("sending", "creating", "created", "answer_kept", "outcome")
# ... and of those, the ones the journal's copy in the bucket has before the step, or the
# step is not taken (journal_copy.py).
BEFORE_MONEY = ("creating",)


class JournalUnwritable(SoundpatchError):
    """An event that must be on disk before its step (BEFORE_MONEY) could not be written:
    the step is not taken."""


class Journal:
    """`copy`: the journal's copy in the output bucket (journal_copy.py), when there is one.

    A journal that cannot be written (its disk filled up, say) is `broken`: the run starts
    no more rows (Batch), an event that must come before money raises JournalUnwritable so
    that the money does not move, and the others are let go (the rows in flight finish as
    they can; the bucket's copy, if any, still gets them)."""

    def __init__(self, run_dir: Path, copy: JournalCopy | None = None) -> None:
        self.path = run_dir / JOURNAL_FILE
        self.copy = copy
        self.broken: str | None = None  # why the journal could not be written, once it could not
        self._lock = threading.Lock()
        self._fd: int | None = None  # opened at the first event: a dry run leaves no trace
        self._torn = False  # a write failed part way: the next line starts on a line of its own

    def write(self, event: str, row_id: str | None = None, **fields: Any) -> None:
        line = _line(event, row_id, fields)
        copy = self.copy if row_id else None
        if copy is not None and event in BEFORE_MONEY:
            copy.add(row_id, event, line)  # in the bucket before money moves, or nothing moves
        if self.broken is not None and self.copy is not None:
            # A line is missing here: from now on the bucket's copy is the record. Lines
            # written here after the gap would read as coming before what the copy alone
            # has, once the two are put together again (merge).
            if event in BEFORE_MONEY:
                self._refuse(copy, row_id)
        else:
            try:
                self._append(line.encode("utf-8"), durable=event in DURABLE_EVENTS)
            except OSError as exc:
                self._broke(exc)
                if event in BEFORE_MONEY:
                    self._refuse(copy, row_id)
        if copy is not None and event not in BEFORE_MONEY:
            copy.add(row_id, event, line)

    def _refuse(self, copy: JournalCopy | None, row_id: str | None) -> None:
        """The step of an event in BEFORE_MONEY is not taken: the journal could not record it."""
        if copy is not None:  # the copy took the create that is not sent now: it says so
            copy.add(row_id, "create_refused", _line("create_refused", row_id, {"reason": self.broken}))
        raise JournalUnwritable(self.broken)

    def _append(self, data: bytes, durable: bool) -> None:
        """One line at the end of the file, in one write (the run's rows append together)."""
        with self._lock:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            if self._torn:
                data = b"\n" + data  # the torn line is skipped when read (parse), this one is not
            self._torn = True
            done = 0
            while done < len(data):  # a short write (a disk filling up) either ends or raises
                done += os.write(self._fd, data[done:])
            self._torn = False
            fd = self._fd
        if durable:
            # Outside the lock: other rows keep appending while this one waits for the disk,
            # and the kernel serves concurrent fsyncs of one file together (group commit).
            # The line is written before the fsync starts, so it is on disk when this returns.
            os.fsync(fd)

    def _broke(self, exc: OSError) -> None:
        why = full_disk(self.path.parent, exc) or f"{exc.strerror or exc}"
        with self._lock:
            self.broken = self.broken or f"the run's journal {self.path} could not be written: {why}"

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _line(event: str, row_id: str | None, fields: dict[str, Any]) -> str:
    record = {"t": round(time.time(), 3), "event": event, **({"row": row_id} if row_id else {}), **fields}
    return json.dumps(record, default=str, ensure_ascii=False) + "\n"


def latest_runs(runs_dir: Path) -> list[str]:
    """The runs kept in `runs_dir` (folders with a journal), the latest written first."""
    found = []
    for folder in runs_dir.iterdir() if runs_dir.is_dir() else []:
        try:
            found.append(((folder / JOURNAL_FILE).stat().st_mtime, folder.name))
        except OSError:  # not a run's folder, or one that recorded nothing
            continue
    return [name for _, name in sorted(found, reverse=True)]


def read_events(run_dir: Path) -> Iterator[dict[str, Any]]:
    """Every complete event; a torn last line (crash mid-write) is ignored."""
    path = run_dir / JOURNAL_FILE
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        yield from parse(f)


def parse(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.endswith("\n"):
            break
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


def split_lines(text: str) -> list[str]:
    """A journal's text as its lines, each ending with its newline; a torn last line is left
    out. (Split at newlines only: a prompt may hold a line separator str.splitlines cuts at.)"""
    return [line + "\n" for line in text.split("\n")[:-1]]


def lines_here(run_dir: Path) -> list[str]:
    """This machine's journal of the run as its lines ([] if it has none)."""
    try:
        return split_lines((run_dir / JOURNAL_FILE).read_text(encoding="utf-8", errors="replace"))
    except FileNotFoundError:
        return []


def merge(here: list[str], there: list[str]) -> tuple[list[str], set[str]]:
    """This machine's journal of a run (`here`) with what its copy in the bucket (`there`)
    has and it has not, and the rows that adds to.

    What only the copy has came after what is here: another machine went on with the run
    after this one (one at a time: lease.py), or this machine's journal stopped being
    written at a gap (its disk filled up) and the copy alone went on (Journal.write). So it
    goes after, in the copy's order; lines both have (the copy is made of the same lines)
    are kept once."""
    known = set(here)
    merged, rows = list(here), set()
    for line in there:
        if line in known:
            continue
        known.add(line)
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        merged.append(line)
        if isinstance(event, dict) and event.get("row"):
            rows.add(event["row"])
    return merged, rows


def restore(run_dir: Path, lines: list[str]) -> None:
    """This machine's journal of the run from now on: `lines` (what it had, with its copy in
    the bucket), in place of what it had, at once (a crash leaves one or the other)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / JOURNAL_FILE
    fresh = path.with_name(f".{JOURNAL_FILE}.{os.getpid()}")
    with open(fresh, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(fresh, path)


def latest_outcomes(events: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last outcome recorded for each row (of a journal's events: `read_events`)."""
    out: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("event") == "outcome":
            out[e["row"]] = e["outcome"]
        elif e.get("event") == "combined":  # the file the row's edit went into, made after it
            for row in e.get("rows", []):
                if row in out:
                    out[row] = {**out[row], "combined": e.get("output", "")}
    return out


class JournalTail:
    """Reads the events appended since the last call (for live progress)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / JOURNAL_FILE
        self._offset = 0
        self._file: int | None = None  # the inode read: a journal put in its place (restore) is read anew

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                if inode != self._file:
                    self._file, self._offset = inode, 0
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1  # leave a torn last line for the next poll
        self._offset += end
        events = []
        for line in chunk[:end].splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events


@dataclass
class RowState:
    """What an earlier attempt of this run left for a row, as the journal tells it."""

    outcome: dict[str, Any] | None = None  # the last outcome, unless an attempt started after it
    provider: str | None = None  # where the last attempt went: only it can collect what it made
    # What the last attempt was for (identity.py), and the clip settings it was sent with:
    # what it paid for is collected only for the same request, cut with those settings.
    request: str | None = None
    identity: str | None = None
    # ... and the request without its damaged spans (identity.sent_identity): a hosted model
    # is sent the same whichever spans the row names, so what it made is collected for either.
    sent: str | None = None
    clip: dict[str, Any] | None = None
    # What the last outcome was for: {"request", "identity", "source_sha256", "source_stamp"}.
    made_for: dict[str, Any] | None = None
    prediction_id: str | None = None  # created, and no outcome recorded since: poll it, never recreate
    in_doubt: bool = False  # a create was sent and no answer recorded: it may exist
    # The last attempt ended with a create still in doubt (its price is in spent_before):
    # a rerun does not send the row again unless told to.
    doubted: bool = False
    # A paid answer was in hand and no outcome recorded since (the run died using it).
    answered: bool = False
    # ... and kept on disk first: {"file", "cost_usd", "prediction_id"}. A paid answer that
    # was not kept is lost, and counts as a create in doubt.
    answer: dict[str, Any] | None = None
    # What is left to collect (prediction_id, answer) was paid for and is counted in the
    # last outcome already: the row failed using it, and it was kept for the next attempt.
    settled: bool = False
    spent_before: float = 0.0  # what the row's recorded outcomes cost
    # Creates the row sent in earlier attempts: as its last outcome counted them, and any
    # sent since (an attempt that died before its outcome).
    sent_before: int = 0
    reported_before: float = 0.0  # of which the provider itself reported
    staged: list[str] = field(default_factory=list)  # staged clips not cleaned up
    # The most one of the row's predictions cost, by the provider that made it.
    charged: dict[str, float] = field(default_factory=dict)

    def lose_answer(self) -> None:
        """Its paid answer's kept file is gone (or the machine that kept it): with a
        prediction id the prediction can still be collected; without one the answer is
        lost, and the create counts as in doubt, as one never answered (or, when the row's
        outcome counts its price already, it failed using it, as doubted): either way not
        paid for again unless told to."""
        self.answer = None
        if self.prediction_id is not None:
            return
        if self.settled:
            self.settled, self.doubted = False, True
        else:
            self.in_doubt = True


def lose_answers(states: dict[str, RowState], kept: Callable[[dict[str, Any]], bool]) -> dict[str, RowState]:
    """`states`, each paid answer `kept` says is no longer there lost (`RowState.lose_answer`)."""
    for s in states.values():
        if s.answer is not None and not kept(s.answer):
            s.lose_answer()
    return states


def row_states(run_dir: Path) -> dict[str, RowState]:
    return states_from(read_events(run_dir))


def states_from(events: Iterable[dict[str, Any]]) -> dict[str, RowState]:
    states: dict[str, RowState] = {}
    for e in events:
        row = e.get("row")
        if not row:
            continue
        s = states.setdefault(row, RowState())
        kind = e.get("event")
        if kind == "sending":  # a new attempt at the row
            s.outcome, s.in_doubt, s.doubted, s.answered, s.answer = None, False, False, False, None
            fields = ("provider", "request", "identity", "clip", "sent")
            s.provider, s.request, s.identity, s.clip, s.sent = (e.get(k) for k in fields)
            s.settled = bool(e.get("settled"))
        elif kind == "creating":
            s.in_doubt = True
            s.sent_before += 1
        elif kind == "create_refused":  # nothing was made (nor sent): no doubt
            s.in_doubt = False
            s.sent_before -= 1
        elif kind == "answered":  # made, billed, and its answer is coming in
            s.in_doubt, s.answered = False, e.get("status", 200) < 400
        elif kind == "answer_kept":
            s.answered = True
            s.answer = {k: e.get(k) for k in ("file", "cost_usd", "prediction_id")}
        elif kind == "created":
            s.prediction_id, s.in_doubt = e.get("prediction_id"), False
        elif kind == "predicted" and s.provider:
            cost = float(e.get("cost_usd") or 0.0)
            s.charged[s.provider] = max(cost, s.charged.get(s.provider, 0.0))
        elif kind == "not_collected":  # another run's prediction, failed: the row is made anew
            s.prediction_id, s.settled = None, False
        elif kind == "staged":
            s.staged.append(e.get("uri", ""))
        elif kind == "unstaged":
            s.staged = [u for u in s.staged if u != e.get("uri")]
        elif kind == "outcome":
            s.outcome = e["outcome"]
            s.made_for = e.get("made_for")
            s.spent_before = float(e["outcome"].get("cost_usd") or 0.0)  # outcomes carry the running total
            s.reported_before = float(e["outcome"].get("provider_cost_usd") or 0.0)
            s.sent_before = int(e["outcome"].get("attempts") or 0)  # a running total too
            s.doubted = s.doubted or s.in_doubt
            s.prediction_id, s.in_doubt, s.answered, s.answer = None, False, False, None
            kept = e.get("kept_paid")  # failed using a paid prediction, kept to collect again
            s.settled = bool(kept)
            if kept:
                s.prediction_id, s.answer = kept.get("prediction_id"), kept.get("answer")
    for s in states.values():
        if s.answered and s.answer is None and s.prediction_id is None:
            s.in_doubt = True  # paid, and the answer was lost with the run: as good as unanswered
    return states


def paid_unfinished(states: dict[str, RowState]) -> tuple[dict[str, str], dict[str, str]]:
    """Rows a run stopped on with money out and no outcome: ({row: provider} with a
    prediction to collect, {row: provider} with a create in doubt)."""
    to_collect, in_doubt = {}, {}
    for row, s in states.items():
        if s.outcome is not None:
            continue
        if s.prediction_id or s.answer:
            to_collect[row] = s.provider or ""
        elif s.in_doubt:
            in_doubt[row] = s.provider or ""
    return to_collect, in_doubt


def prediction_seconds(events: Iterable[dict[str, Any]]) -> list[float]:
    """For each prediction that came back (of a journal's events): seconds from its row
    being sent to the result."""
    sent: dict[str, float] = {}
    seconds = []
    for e in events:
        row, kind = e.get("row"), e.get("event")
        if kind == "sending" and row:
            sent[row] = e["t"]
        elif kind == "predicted" and row in sent:
            seconds.append(round(e["t"] - sent.pop(row), 3))
    return seconds
