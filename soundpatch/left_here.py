"""Predictions that stopped runs on this machine paid for and never collected.

A run killed with predictions in flight (kill -9, the OOM killer, a power cut, two
Ctrl-Cs) has paid for them; `--run-id` with its id collects them. Run again without it (the
same command, as one does after a crash; or the next night's run), the new run sent each
of those edits again and paid for it a second time: up to `limits.concurrency`
predictions a crash. So a run looks, before it starts, through the journals of the runs in
its runs_dir that no process is running (their run lock is free) for predictions made and
not used (created, and no outcome since; not one a row failed using, which its own run
keeps for its rerun), and a row of the same edit (the same identity: source content,
region, prompt, seed, provider, model, clip and splice settings) collects that prediction
at no new cost instead of paying for another. With the outputs in a bucket, the edit claims there do
the same across machines (edit_claims.py); this is the same for runs of one machine.

A prediction is offered to one other run only: the run taking it up journals so
(`created` with `from_run`), and later runs pass it by. One that failed there (its result
expired at the provider, say) would otherwise fail a row of every run after it. A
provider that gives no id (Stability) leaves the paid answer the run kept on disk
(answers.py) instead: offered the same way, copied into the run taking it up (its
`answer_kept` names `from_run` and `from_file`). One whose file is gone is lost: in doubt.

A create a stopped run left **in doubt** (sent, and its answer never came: killed while
it was out, or timed out) may exist and be billed, with no id to collect it by. Its own
rerun does not send it again unless `provider.resubmit_in_doubt: true`; nor does a run
with another id (the next night's): a row of that edit fails at no cost, naming the run,
until a run told to resubmit sends it (it journals so: `sending` names those runs in
`resent_doubt`, and their doubt is cleared for the runs after it) or the edit's result is
made some other way.

What each run left is cached in runs_dir/LEFT_CACHE by its journal's size and time (and
its answers folder's time), so a runs folder of a year of nightly runs is read once, not
at every start. `--force` does not collect them (it asks for a new prediction); a create
in doubt holds all the same.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soundpatch.answers import AnswerShelf
from soundpatch.humanize import named_runs, plural
from soundpatch.journal import JOURNAL_FILE, lose_answers, read_events, states_from
from soundpatch.leftovers import Left, Leftovers
from soundpatch.locks import RunLock

LEFT_CACHE = ".left-predictions.json"


class LeftHere(Leftovers):
    def __init__(self, runs_dir: Path, run_id: str) -> None:
        super().__init__()
        found = _left_by_stopped_runs(runs_dir, run_id)
        for run, left in sorted(found.left.items()):
            for identity, (prediction_id, provider, *kept) in left.items():
                answer = kept[0] if kept and isinstance(kept[0], dict) else None
                # (A run that took it up and stopped before it was used still offers it.)
                if not found.taken_by.get(prediction_id or _answer_key(run, answer), set()) - {run}:
                    self._left.setdefault(identity, Left(run, prediction_id, provider, answer))
        self._doubted: dict[str, list[str]] = {}  # identity -> the stopped runs that left a create for it in doubt
        for run, identities in sorted(found.doubt.items()):
            for identity in identities:
                if (identity, run) not in found.resent:
                    self._doubted.setdefault(identity, []).append(run)
        self.refused: dict[str, int] = {}  # run id -> rows not sent here for its creates in doubt

    def has(self, identity: str) -> bool:
        with self._lock:
            return identity in self._left

    def doubted_by(self, identity: str) -> list[str]:
        """The stopped runs that sent a create for `identity` and never heard back (it may
        exist, and be billed), but for those a run since was told to send again."""
        return list(self._doubted.get(identity, []))

    def not_sent(self, run: str) -> None:
        """A row of an edit `run` left in doubt was not sent here."""
        with self._lock:
            self.refused[run] = self.refused.get(run, 0) + 1

    def doubt_note(self) -> str:
        if not self.refused:
            return ""
        count = sum(self.refused.values())
        return (
            f"{plural(count, 'row')} of edits that {named_runs(self.refused)} sent and never heard back from "
            f"{'was' if count == 1 else 'were'} not sent again (that run counted {'it' if count == 1 else 'them'} "
            "as spent; set provider.resubmit_in_doubt: true to send them)."
        )

    def note(self) -> str:
        parts = []
        if self.collected:
            count = sum(self.collected.values())
            parts.append(
                f"{count} {'result was' if count == 1 else 'results were'} made from predictions that "
                f"{named_runs(self.collected)} paid for and never collected (stopped before they came back), at no "
                "new cost here."
            )
        if self.uncollectable:
            count = sum(self.uncollectable.values())
            parts.append(
                f"{count} of the predictions {named_runs(self.uncollectable)} left had failed, or could not be seen "
                f"with this key, so {'its edit was' if count == 1 else 'their edits were'} paid for here."
            )
        return " ".join(parts)


@dataclass
class _Found:
    """What the stopped runs in a runs folder left, by run."""

    left: dict[str, dict[str, tuple]] = field(default_factory=dict)  # run -> {identity: (id, provider[, answer])}
    taken_by: dict[str, set[str]] = field(default_factory=dict)  # prediction id -> the runs that took it up
    doubt: dict[str, list[str]] = field(default_factory=dict)  # run -> identities it left a create in doubt for
    resent: set[tuple[str, str]] = field(default_factory=set)  # (identity, run) whose doubt a run sent again


def _left_by_stopped_runs(runs_dir: Path, run_id: str) -> _Found:
    """What the runs in `runs_dir` that no process is running, but `run_id`, left: their
    predictions not used, and their creates in doubt."""
    cache_path = runs_dir / LEFT_CACHE
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    found, fresh = _Found(), {}
    for journal in sorted(runs_dir.glob(f"*/{JOURNAL_FILE}")):
        run = journal.parent.name
        if run == run_id:
            continue
        try:
            stat = journal.stat()
        except OSError:
            continue
        # Its kept answers' folder too: a file gone from there is a paid answer lost.
        stamp = [stat.st_size, stat.st_mtime_ns, _changed(AnswerShelf(journal.parent).folder)]
        cached = cache.get(run)
        known = isinstance(cached, dict) and cached.get("journal") == stamp and "doubt" in cached
        if known and not cached.get("left") and not cached.get("doubt"):
            # Nothing to offer, nor to doubt: whether it runs now does not matter.
            left, taken_up, doubt, resent = {}, cached.get("tried") or [], [], cached.get("resent") or []
        else:
            lock = RunLock(journal.parent)
            try:
                if not lock.take_if_stopped():
                    continue  # running now (again): its own claims keep its edits (locks.py)
            except OSError:
                continue  # not ours to look at
            try:
                if known:
                    left, taken_up = cached["left"], cached.get("tried") or []
                    doubt, resent = cached["doubt"], cached.get("resent") or []
                else:
                    left, taken_up, doubt, resent = _left_in(journal.parent)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            finally:
                lock.release()
        fresh[run] = {"journal": stamp, "left": left, "tried": taken_up, "doubt": doubt, "resent": resent}
        for prediction_id in taken_up:
            found.taken_by.setdefault(prediction_id, set()).add(run)
        found.resent.update((str(identity), str(doubted)) for identity, doubted in resent)
        if left:
            found.left[run] = {identity: tuple(pair) for identity, pair in left.items()}
        if doubt:
            found.doubt[run] = list(doubt)
    if fresh != cache:
        try:
            scratch = cache_path.with_name(f"{LEFT_CACHE}.{os.getpid()}")
            scratch.write_text(json.dumps(fresh), encoding="utf-8")
            os.replace(scratch, cache_path)
        except OSError:
            pass  # read again next time
    return found


def _changed(folder: Path) -> int:
    try:
        return folder.stat().st_mtime_ns
    except OSError:
        return 0


def _left_in(run_dir: Path) -> tuple[dict[str, list], list[str], list[str], list[list[str]]]:
    """({identity: [prediction id, provider]} of the predictions a run made and did not use,
    not those a row of it failed using (kept for that run's own rerun, which says so), or
    ["", provider, its record] of a paid answer it kept and did not use; the ids of other
    runs' predictions it took up (and their answers: `_answer_key`); the identities its
    last attempts left a create in doubt for; (identity, run) of other runs' doubts it was
    told to send again). A prediction taken up once is not offered again: one that failed
    there (expired at the provider, say) would fail every run after."""
    events = list(read_events(run_dir))
    kept_paid = [e.get("kept_paid") or {} for e in events if e.get("event") == "outcome"]
    failed_with = {str(k.get("prediction_id")) for k in kept_paid}
    failed_with |= {str((k.get("answer") or {}).get("file")) for k in kept_paid if k.get("answer")}
    shelf = AnswerShelf(run_dir)
    left: dict[str, list] = {}
    doubt: set[str] = set()
    for s in lose_answers(states_from(events), shelf.exists).values():
        if not s.identity:
            continue
        if s.prediction_id:
            if s.prediction_id not in failed_with:
                left[s.identity] = [s.prediction_id, s.provider or ""]
        elif s.answer:  # paid, and kept here: no id to collect by
            if str(s.answer.get("file")) not in failed_with:
                left[s.identity] = ["", s.provider or "", s.answer]
        elif s.in_doubt or s.doubted:
            doubt.add(s.identity)
    taken_up = {str(e["prediction_id"]) for e in events if e.get("event") == "created" and e.get("from_run")}
    taken_up |= {
        _answer_key(str(e["from_run"]), {"file": e.get("from_file")})
        for e in events
        if e.get("event") == "answer_kept" and e.get("from_run")
    }
    sent_again = {
        (str(e.get("identity")), str(run))
        for e in events
        if e.get("event") == "sending"
        for run in e.get("resent_doubt") or []
    }
    # Lists, as JSON keeps them.
    return left, sorted(taken_up), sorted(doubt), [[identity, run] for identity, run in sorted(sent_again)]


def _answer_key(run: str, answer: dict[str, Any] | None) -> str:
    """What names a kept answer among what runs took up (a prediction, by its id)."""
    return f"answer:{run}/{(answer or {}).get('file')}"
