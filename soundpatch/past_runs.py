"""`soundpatch runs`: the runs kept in the runs folder, with what each made and spent.

A nightly deployment, a week of restoration batches, or a user's own retries leave one
folder a run in `runs_dir` (and, where the outputs go to a bucket, a copy of each run's
journal there: a worker's runs are known from anywhere); each one's report says what that
run spent. This says it of all of them at once, from their journals (what a report is
made from, so a run killed before it wrote its report is counted too): when each began,
its manifest, its results by status, what it spent, and whether it is still going,
finished, or stopped with money out (predictions paid for and not collected, which
resuming it collects at no new cost).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soundpatch.config import Config
from soundpatch.journal import JOURNAL_FILE, latest_outcomes, lines_here, merge, paid_unfinished, parse, states_from
from soundpatch.journal_copy import RUNS_PREFIX, JournalCopy
from soundpatch.lease import lease_uri
from soundpatch.locks import run_going
from soundpatch.outcome import NOT_STARTED, STATUSES
from soundpatch.s3 import S3, S3Uri


@dataclass(frozen=True)
class MoneyOut:
    """Predictions a run has paid for (or may have: a create with no answer) and no outcome
    of yet: in flight while it runs, left to collect once it stopped."""

    to_collect: int = 0  # rows with a prediction created, or its paid answer kept
    in_doubt: int = 0  # rows whose create went out with no answer (it may exist)
    price_usd: float = 0.0  # what they cost, about: each at its provider's price_usd

    @property
    def rows(self) -> int:
        return self.to_collect + self.in_doubt


def money_out(events: Iterable[dict[str, Any]], cfg: Config) -> MoneyOut:
    """What a run's journal (its events) shows paid for and not yet in an outcome."""
    to_collect, in_doubt = paid_unfinished(states_from(events))
    providers = [*to_collect.values(), *in_doubt.values()]
    price = sum(cfg.provider.price_of(p or cfg.provider.name) for p in providers)
    return MoneyOut(len(to_collect), len(in_doubt), price)


@dataclass(frozen=True)
class PastRun:
    run_id: str
    started: float  # when it first began (seconds since the epoch)
    manifest: str
    results: int | None  # its manifest's results, as the run counted them when it last began
    by_status: Counter[str] = field(default_factory=Counter)
    spent_usd: float = 0.0  # what its rows' outcomes cost (the report's spent)
    providers: tuple[str, ...] = ()
    going: bool = False  # a process is running it now
    out: MoneyOut = MoneyOut()
    elsewhere: bool = False  # known from its journal's copy in the output bucket alone: made on another machine

    @property
    def done(self) -> int:
        return sum(self.by_status.values())

    @property
    def not_done(self) -> int | None:
        """Results with no outcome yet; None where the run's count of them is not known."""
        return None if self.results is None else max(0, self.results - self.done)

    @property
    def state(self) -> str:
        """`going`, `finished` (every result has an outcome), or `stopped`."""
        if self.going:
            return "going"
        whole = self.results is not None and self.done >= self.results
        return "finished" if whole and not self.out.rows else "stopped"

    def as_dict(self) -> dict[str, Any]:
        """For `soundpatch runs --json`."""
        return {
            "run_id": self.run_id,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.gmtime(self.started)),
            "manifest": self.manifest,
            "providers": list(self.providers),
            "state": self.state,
            "results": self.results,
            "journal": "bucket" if self.elsewhere else "here",
            "by_status": {s: self.by_status[s] for s in STATUSES},
            "spent_usd": self.spent_usd,
            "out_rows": self.out.rows,
            "out_usd": round(self.out.price_usd, 6),
        }


def past_runs(runs_dir: Path, cfg: Config, since: float | None = None, s3: S3 | None = None) -> list[PastRun]:
    """The runs in `runs_dir`, and with `s3`, those whose journal is copied to the output
    bucket (journal_copy.py: a worker's, made on another machine), begun at `since` or
    later, the latest first. A run in both is told from both journals, as `report` does.
    Raises RowError when the bucket cannot be listed or read."""
    here = {f.name: f for f in sorted(runs_dir.iterdir()) if (f / JOURNAL_FILE).is_file()} if runs_dir.is_dir() else {}
    output = S3Uri.parse(cfg.output.uri) if s3 is not None and cfg.output.uri.startswith("s3://") else None
    there = _runs_in_bucket(s3, output) if s3 is not None and output is not None else set()
    found = []
    for run_id in sorted(set(here) | there):
        if since is not None and run_id not in there and _began(here[run_id]) < since:
            continue  # (a year of nights: only this month's journals are read through)
        lines = lines_here(here[run_id]) if run_id in here else []
        going = run_going(here[run_id]) if run_id in here else False
        if run_id in there:
            assert s3 is not None and output is not None  # (there is nothing there without them)
            copy = JournalCopy(s3, output, run_id).lines()
            lines = merge(lines, copy)[0] if lines else copy
            going = going or _leased(s3, output, run_id, cfg.storage.s3.lease_seconds)
        run = _past_run(run_id, list(parse(lines)), cfg, going, elsewhere=run_id not in here)
        if run is not None and (since is None or run.started >= since):
            found.append(run)
    return sorted(found, key=lambda r: r.started, reverse=True)


def _began(run_dir: Path) -> float:
    """When the run in `run_dir` first began, by its journal's first line (`inf` where that
    does not say: the run is read through)."""
    try:
        with open(run_dir / JOURNAL_FILE, encoding="utf-8", errors="replace") as f:
            first = json.loads(f.readline())
        return float(first["t"]) if first.get("event") == "run_started" else math.inf
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return math.inf


def _runs_in_bucket(s3: S3, output: S3Uri) -> set[str]:
    """The run ids with a journal's copy under the output prefix."""
    folder = output.child(f"{RUNS_PREFIX}/")
    keys = s3.keys(folder)
    return {k[len(folder.key) :].split("/", 1)[0] for k in keys if k.endswith(".jsonl")}


def _leased(s3: S3, output: S3Uri, run_id: str, seconds: float) -> bool:
    """Whether a machine holds the run's lease in the bucket (lease.py): it goes on there."""
    there = s3.age(lease_uri(output, run_id))
    return there is not None and there[1] < seconds


def _past_run(run_id: str, events: list[dict[str, Any]], cfg: Config, going: bool, elsewhere: bool) -> PastRun | None:
    if not events:
        return None
    starts = [e for e in events if e.get("event") == "run_started"]
    outcomes = latest_outcomes(events)
    # Rows a stopping run never started are left to do, not failed (their reason says so).
    ended = [o for o in outcomes.values() if not str(o.get("error") or "").startswith(NOT_STARTED)]
    by_status = Counter({s: n for s in STATUSES if (n := sum(o.get("status") == s for o in ended))})
    providers = {o.get("provider") or "" for o in outcomes.values()} | {
        e.get("provider") or "" for e in events if e.get("event") == "sending"
    }
    return PastRun(
        run_id=run_id,
        started=float(starts[0].get("t") if starts else min(float(e.get("t") or 0.0) for e in events)),
        manifest=str(starts[-1].get("manifest") or "") if starts else "",
        # Unknown of a run known only by its rows' copies (it has not ended: it is going, or was killed).
        results=int(starts[-1].get("total") or 0) if starts else None,
        by_status=by_status,
        spent_usd=round(sum(float(o.get("cost_usd") or 0.0) for o in outcomes.values()), 6),
        providers=tuple(sorted(p for p in providers if p)),
        going=going,
        out=money_out(events, cfg),
        elsewhere=elsewhere,
    )
