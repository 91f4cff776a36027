"""What happened to one result, and what a whole run's outcomes mean for the exit status."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from soundpatch.humanize import plural

SUCCEEDED = "succeeded"
FAILED = "failed"
INVALID = "invalid"
SKIPPED_BUDGET = "skipped_budget"
SKIPPED_DONE = "skipped_done"
STATUSES = (SUCCEEDED, FAILED, INVALID, SKIPPED_BUDGET, SKIPPED_DONE)

EXIT_OK = 0
EXIT_ROWS_FAILED = 1
EXIT_NOTHING_RAN = 2
EXIT_BUDGET = 3
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM; the same --run-id resumes


@dataclass
class Outcome:
    row_id: str
    input: str
    start: float | None
    end: float | None
    prompt: str
    seed: int | None
    provider: str
    status: str
    cost_usd: float = 0.0
    output: str = ""
    prediction_id: str = ""
    attempts: int = 0
    error: str = ""
    method: str = ""
    seconds: float = 0.0
    reused_from: str = ""  # skipped_done: the earlier result this one is a copy of
    provider_cost_usd: float = 0.0  # what the provider itself reported (cost_usd adds creates in doubt)
    # Quality checks on the published result (soundpatch.quality); empty when none ran.
    checks: str = ""
    outside_max_diff: float | None = None
    seam_in: float | None = None
    seam_out: float | None = None
    loudness_delta_db: float | None = None
    clipped: int | None = None
    offset_ms: float | None = None
    combined: str = ""  # the file this row's edit went into with other rows' (soundpatch/combine.py)
    # The spans of its region the row replaced, where it named them (`damaged`): a hosted
    # model's as its audio went in, with its crossfades (edits.spans_for_a_model).
    damaged: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def take_checks(self, quality: dict[str, Any]) -> None:
        """The quality checks' numbers (quality.py) onto the report's columns."""
        for key in ("checks", "outside_max_diff", "seam_in", "seam_out", "loudness_delta_db", "clipped", "offset_ms"):
            if key in quality:
                setattr(self, key, quality[key])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


# How the reason of a row a stopping run never started begins (it is `failed`, at no cost):
# `soundpatch runs` counts such rows as not done, not as failed.
NOT_STARTED = "Not started: "


def exit_status(outcomes: Iterable[Outcome]) -> int:
    """0 all succeeded or already done; 1 any failed or invalid; 3 only the budget stopped rows."""
    counts = Counter(o.status for o in outcomes)
    if counts[FAILED] or counts[INVALID]:
        return EXIT_ROWS_FAILED
    if counts[SKIPPED_BUDGET]:
        return EXIT_BUDGET
    return EXIT_OK


def by_reason(outcomes: Iterable[Outcome]) -> list[tuple[str, str, list[str]]]:
    """The results that did not succeed, gathered by what ended them: (status, reason, row
    ids), the most common first (a refused key, or a provider out of reach, is one reason
    for hundreds of rows). A reason naming the row's own prediction ("Each Labs reports
    prediction 9318de8c... failed: ...") is one with the others like it but for that id,
    said with `<id>` in its place when it ended more than one row."""
    alike: dict[tuple[str, str], tuple[str, list[str]]] = {}
    for o in outcomes:
        if o.status not in (SUCCEEDED, SKIPPED_DONE):
            own_id = o.prediction_id if len(o.prediction_id or "") >= MIN_ID_CHARACTERS else ""
            key = (o.status, o.error.replace(own_id, "<id>") if own_id else o.error)
            alike.setdefault(key, (o.error, []))[1].append(o.row_id)
    ranked = sorted(alike.items(), key=lambda item: -len(item[1][1]))
    return [(status, reason if len(rows) > 1 else first, rows) for (status, reason), (first, rows) in ranked]


MIN_ID_CHARACTERS = 8  # a prediction id shorter than this is not taken out of a reason (it may be a word)


# The report's columns, in order: every Outcome field but `extra` (which becomes the
# manifest's own columns after these).
REPORT_COLUMNS = tuple(name for name in Outcome.__dataclass_fields__ if name != "extra")


def carried_name(column: str) -> str:
    """A manifest's own column as the report (and a result's metadata) names it: as it is,
    or `manifest_<name>` where the report has a column of that name (`status`)."""
    return f"manifest_{column}" if column in REPORT_COLUMNS else column


def written_name(carried: str) -> str:
    """The manifest's own name of a column `carried_name` gave `carried`."""
    own = carried.removeprefix("manifest_")
    return own if own != carried and own in REPORT_COLUMNS else carried


@dataclass(frozen=True)
class ToFinish:
    """What running a run again (its run id: what is done is kept, not paid for again) would
    do: try its failed results anew, and make those the budget stopped, given a budget of
    `budget_usd` (what it spent and `more_usd`, their price)."""

    failed: int
    stopped: int
    more_usd: float
    budget_usd: float

    @classmethod
    def of(cls, summary: dict[str, Any]) -> ToFinish:
        """As a report's summary records it (`to_finish`; nothing, in a report without one)."""
        kept = summary.get("to_finish") or {}
        return cls(*(kept.get(name) or 0 for name in ("failed", "stopped", "more_usd", "budget_usd")))

    def sentences(self, again: str, with_budget: Callable[[float], str]) -> list[str]:
        """What finishing the run takes, a sentence each. `again`: what runs it again (a
        command, a flow run) in the words of where it is said; `with_budget(usd)`: the same,
        given the budget it needs."""
        said = []
        if self.failed:
            said.append(f"{again} tries the {plural(self.failed, 'failed result')} again, keeping what is done.")
        if self.stopped:
            said.append(
                f"The {plural(self.stopped, 'result')} the budget stopped would cost about ${self.more_usd:.2f} more: "
                f"{with_budget(self.budget_usd)} makes them, keeping what is done."
            )
        return said


def to_finish(outcomes: Iterable[Outcome], spent_usd: float, price_of: Callable[[str], float]) -> ToFinish:
    """`price_of(provider)`: what one of its predictions costs. Rows a stopping run never
    started are not counted as failed (that run was interrupted: resuming it is said apart)."""
    failed = stopped = 0
    more = 0.0
    for o in outcomes:
        if o.status == FAILED and not o.error.startswith(NOT_STARTED):
            failed += 1
        elif o.status == SKIPPED_BUDGET:
            stopped += 1
            more += price_of(o.provider)
    budget = math.ceil(round((spent_usd + more) * 100, 6)) / 100  # (in cents, up)
    return ToFinish(failed, stopped if more else 0, more, budget)
