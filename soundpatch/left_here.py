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
expired at the provider, say) would otherwise fail a row of every run after it.

What each run left is cached in runs_dir/LEFT_CACHE by its journal's size and time, so a
runs folder of a year of nightly runs is read once, not at every start. `--force` does
not collect them (it asks for a new prediction).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from soundpatch.journal import JOURNAL_FILE, read_events, states_from
from soundpatch.leftovers import Left, Leftovers
from soundpatch.locks import RunLock

LEFT_CACHE = ".left-predictions.json"


class LeftHere(Leftovers):
    def __init__(self, runs_dir: Path, run_id: str) -> None:
        super().__init__()
        left_by, taken_by = _left_by_stopped_runs(runs_dir, run_id)
        for run, left in sorted(left_by.items()):
            for identity, (prediction_id, provider) in left.items():
                # (A run that took it up and stopped before it was used still offers it.)
                if not taken_by.get(prediction_id, set()) - {run}:
                    self._left.setdefault(identity, Left(run, prediction_id, provider))

    def has(self, identity: str) -> bool:
        with self._lock:
            return identity in self._left

    def note(self) -> str:
        parts = []
        if self.collected:
            count = sum(self.collected.values())
            parts.append(
                f"{count} {'result was' if count == 1 else 'results were'} made from predictions that "
                f"{_runs(self.collected)} paid for and never collected (stopped before they came back), at no "
                "new cost here."
            )
        if self.uncollectable:
            count = sum(self.uncollectable.values())
            parts.append(
                f"{count} of the predictions {_runs(self.uncollectable)} left had failed, or could not be seen "
                f"with this key, so {'its edit was' if count == 1 else 'their edits were'} paid for here."
            )
        return " ".join(parts)


def _runs(runs: dict[str, int]) -> str:
    named = sorted(runs)
    shown = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
    return f"run{'s' if len(named) > 1 else ''} {shown}"


def _left_by_stopped_runs(
    runs_dir: Path, run_id: str
) -> tuple[dict[str, dict[str, tuple[str, str]]], dict[str, set[str]]]:
    """({run id: {identity: (prediction id, provider)}} of the runs in `runs_dir` no process
    is running, but `run_id`; {prediction id: the runs that took it up from another})."""
    cache_path = runs_dir / LEFT_CACHE
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    found, fresh, taken_by = {}, {}, {}
    for journal in sorted(runs_dir.glob(f"*/{JOURNAL_FILE}")):
        run = journal.parent.name
        if run == run_id:
            continue
        try:
            stat = journal.stat()
        except OSError:
            continue
        stamp = [stat.st_size, stat.st_mtime_ns]
        cached = cache.get(run)
        known = isinstance(cached, dict) and cached.get("journal") == stamp
        if known and not cached.get("left"):  # nothing to offer: whether it runs now does not matter
            left, taken_up = {}, cached.get("tried") or []
        else:
            lock = RunLock(journal.parent)
            try:
                if not lock.take_if_stopped():
                    continue  # running now (again): its own claims keep its edits (locks.py)
            except OSError:
                continue  # not ours to look at
            try:
                left, taken_up = (cached["left"], cached.get("tried") or []) if known else _left_in(journal.parent)
            except (OSError, ValueError):
                continue
            finally:
                lock.release()
        fresh[run] = {"journal": stamp, "left": left, "tried": taken_up}
        for prediction_id in taken_up:
            taken_by.setdefault(prediction_id, set()).add(run)
        if left:
            found[run] = {identity: tuple(pair) for identity, pair in left.items()}
    if fresh != cache:
        try:
            scratch = cache_path.with_name(f"{LEFT_CACHE}.{os.getpid()}")
            scratch.write_text(json.dumps(fresh), encoding="utf-8")
            os.replace(scratch, cache_path)
        except OSError:
            pass  # read again next time
    return found, taken_by


def _left_in(run_dir: Path) -> tuple[dict[str, list[str]], list[str]]:
    """({identity: [prediction id, provider]} of the predictions a run made and did not use,
    not those a row of it failed using (kept for that run's own rerun, which says so); the
    ids of other runs' predictions it took up). A prediction taken up once is not offered
    again: one that failed there (expired at the provider, say) would fail every run after."""
    events = list(read_events(run_dir))
    failed_with = {str((e.get("kept_paid") or {}).get("prediction_id")) for e in events if e.get("event") == "outcome"}
    left = {
        s.identity: [s.prediction_id, s.provider or ""]
        for s in states_from(events).values()
        if s.prediction_id and s.identity and s.prediction_id not in failed_with
    }
    taken_up = sorted({str(e["prediction_id"]) for e in events if e.get("event") == "created" and e.get("from_run")})
    return left, taken_up
