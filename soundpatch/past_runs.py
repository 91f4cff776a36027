"""`soundpatch runs`: the runs kept in the runs folder, with what each made and spent.

A nightly deployment, a week of restoration batches, or a user's own retries leave one
folder a run in `runs_dir`; each one's report says what that run spent. This says it of
all of them at once, from their journals (what a report is made from, so a run killed
before it wrote its report is counted too): when each began, its manifest, its results by
status, what it spent, and whether it is still going, finished, or stopped with money out
(predictions paid for and not collected, which resuming it collects at no new cost).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soundpatch.config import Config
from soundpatch.journal import JOURNAL_FILE, latest_outcomes, lines_here, paid_unfinished, parse, states_from
from soundpatch.locks import run_going
from soundpatch.outcome import STATUSES


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
    price = sum(cfg.provider.for_provider(p or cfg.provider.name).price for p in providers)
    return MoneyOut(len(to_collect), len(in_doubt), price)


@dataclass(frozen=True)
class PastRun:
    run_id: str
    started: float  # when it first began (seconds since the epoch)
    manifest: str
    results: int  # its manifest's results, as the run counted them when it last began
    by_status: Counter[str] = field(default_factory=Counter)
    spent_usd: float = 0.0  # what its rows' outcomes cost (the report's spent)
    providers: tuple[str, ...] = ()
    going: bool = False  # a process is running it now
    out: MoneyOut = MoneyOut()

    @property
    def done(self) -> int:
        return sum(self.by_status.values())

    def as_dict(self) -> dict[str, Any]:
        """For `soundpatch runs --json`."""
        return {
            "run_id": self.run_id,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.gmtime(self.started)),
            "manifest": self.manifest,
            "providers": list(self.providers),
            "state": self.state,
            "results": self.results,
            "by_status": {s: self.by_status[s] for s in STATUSES},
            "spent_usd": self.spent_usd,
            "out_rows": self.out.rows,
            "out_usd": round(self.out.price_usd, 6),
        }

    @property
    def state(self) -> str:
        """`going`, `finished` (every result has an outcome), or `stopped`."""
        if self.going:
            return "going"
        return "finished" if self.done >= self.results and not self.out.rows else "stopped"


def past_runs(runs_dir: Path, cfg: Config, since: float | None = None) -> list[PastRun]:
    """The runs in `runs_dir` that began at `since` or later, the latest first. A folder
    without a journal (not a run's, or a run stopped before its first line) is left out."""
    found = []
    for folder in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        if not (folder / JOURNAL_FILE).is_file():
            continue
        run = _past_run(folder, cfg)
        if run is not None and (since is None or run.started >= since):
            found.append(run)
    return sorted(found, key=lambda r: r.started, reverse=True)


def _past_run(folder: Path, cfg: Config) -> PastRun | None:
    events = list(parse(lines_here(folder)))
    starts = [e for e in events if e.get("event") == "run_started"]
    if not starts:
        return None
    outcomes = latest_outcomes(events)
    by_status = Counter({s: n for s in STATUSES if (n := sum(o.get("status") == s for o in outcomes.values()))})
    providers = {o.get("provider") or "" for o in outcomes.values()} | {
        e.get("provider") or "" for e in events if e.get("event") == "sending"
    }
    return PastRun(
        run_id=folder.name,
        started=float(starts[0].get("t") or 0.0),
        manifest=str(starts[-1].get("manifest") or ""),
        results=int(starts[-1].get("total") or 0),
        by_status=by_status,
        spent_usd=round(sum(float(o.get("cost_usd") or 0.0) for o in outcomes.values()), 6),
        providers=tuple(sorted(p for p in providers if p)),
        going=run_going(folder),
        out=money_out(events, cfg),
    )
