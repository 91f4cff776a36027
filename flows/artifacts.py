"""What the Prefect UI shows for a run: progress while it goes, then outcomes and money.

- a progress artifact, updated as results complete (at most once a second), its
  description saying how many ended, failed and what they spent;
- a table artifact of outcomes (key `soundpatch-outcomes`; the first TABLE_ROWS results,
  the report has them all);
- a markdown artifact with the summary and the money (key `soundpatch-summary`).

Artifacts are a view: if the API refuses one, the run goes on and says so in its log (once
a minute at most: each refused write waits out the Prefect client's retries).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from soundpatch.outcome import FAILED, INVALID, STATUSES, Outcome, ToFinish, by_reason

TABLE_ROWS = 1000
TABLE_COLUMNS = ("row_id", "status", "cost_usd", "checks", "output", "error")
log = logging.getLogger("soundpatch")


class RunArtifacts:
    """A run's artifacts. While Prefect's API refuses them (its server is away), each write
    waits out the Prefect client's retries: after one is refused none is tried for
    AWAY_SECONDS, and that is said once, not for every artifact."""

    AWAY_SECONDS = 60.0

    def __init__(self, total: int, run_id: str, budget_usd: float) -> None:
        self.run_id, self.budget = run_id, budget_usd
        self.total, self.done, self.bad, self.spent, self._next = max(total, 1), 0, 0, 0.0, 0.0
        self._away_until = 0.0
        self._progress: UUID | None = self._quietly(
            lambda: create_progress_artifact(0.0, description=self._description())
        )

    def advance(self, outcomes: Sequence[Outcome]) -> None:
        """Progress, at most once a second (and the last of it as it comes)."""
        self.done += len(outcomes)
        self.bad += sum(o.status in (FAILED, INVALID) for o in outcomes)
        self.spent += sum(o.cost_usd or 0.0 for o in outcomes)
        now = time.monotonic()
        if self._progress is not None and (now >= self._next or self.done >= self.total):
            artifact, progress = self._progress, 100.0 * min(self.done, self.total) / self.total
            self._quietly(lambda: update_progress_artifact(artifact, progress, description=self._description()))
            self._next = time.monotonic() + 1.0

    def _description(self) -> str:
        return (
            f"soundpatch run {self.run_id}: {min(self.done, self.total)}/{self.total} results ended, "
            f"{self.bad} failed or invalid, ${self.spent:.2f} of ${self.budget:.2f} spent"
        )

    def publish(
        self, outcomes: Sequence[Outcome], summary: dict[str, Any], report_path: str, finish: ToFinish | None = None
    ) -> None:
        """The outcomes' table and the summary, as the run ends; `finish`: what running it
        again would do (outcome.to_finish)."""
        table = [{k: getattr(o, k) for k in TABLE_COLUMNS} for o in outcomes[:TABLE_ROWS]]
        shown = f"first {TABLE_ROWS} of {len(outcomes)}" if len(outcomes) > TABLE_ROWS else f"all {len(outcomes)}"
        self._quietly(
            lambda: create_table_artifact(
                table, key="soundpatch-outcomes", description=f"Outcomes of run {self.run_id} ({shown})"
            )
        )
        self._quietly(
            lambda: create_markdown_artifact(
                summary_markdown(summary, report_path, by_reason(outcomes), finish),
                key="soundpatch-summary",
                description=f"Summary of run {self.run_id}",
            )
        )

    def _quietly(self, make):  # noqa: ANN001, ANN202 - a thunk and whatever it returns
        if time.monotonic() < self._away_until:
            return None
        try:
            return make()
        except Exception as exc:  # noqa: BLE001 - a view must not stop a paid batch
            self._away_until = time.monotonic() + self.AWAY_SECONDS
            log.warning(
                "Prefect artifact not written: %s: %s; none is tried for a minute (the run's report has it all).",
                type(exc).__name__,
                exc,
            )
            return None


def summary_markdown(
    summary: dict[str, Any],
    report_path: str,
    reasons: Sequence[tuple[str, str, list[str]]] = (),
    finish: ToFinish | None = None,
) -> str:
    """`reasons`: why results did not succeed (soundpatch.outcome.by_reason), the first ten
    shown; `finish`: what running the flow again with the run's id would do."""
    by_status = summary.get("by_status", {})
    lines = [
        f"# soundpatch run `{summary['run_id']}`",
        "",
        "| | |",
        "|---|---|",
        f"| spent | **${summary.get('spent_usd', 0):.2f}** of ${summary.get('budget_usd', 0):.2f} budget |",
        f"| provider reported | ${summary.get('provider_cost_usd', 0):.2f} |",
        f"| provider | {summary.get('provider', '')} |",
        f"| wall time | {summary.get('wall_seconds', 0):.1f} s |",
        f"| flagged by checks | {summary.get('flagged', 0)} |",
        "",
        "| status | results |",
        "|---|---|",
        *[f"| {s} | {by_status.get(s, 0)} |" for s in STATUSES],
        "",
    ]
    if reasons:
        lines += ["| results | why they did not succeed |", "|---|---|"]
        lines += [f"| {len(rows)} {status} | {_cell(reason)} |" for status, reason, rows in reasons[:10]]
        if len(reasons) > 10:
            lines.append(f"| {sum(len(rows) for *_, rows in reasons[10:])} | other reasons (see the report) |")
        lines.append("")
    lines += _finishing(summary["run_id"], finish)
    lines.append(f"Report: `{report_path}`")
    if summary.get("report_uri"):
        lines.append(f"In the bucket: `{summary['report_uri']}`")
    return "\n".join(lines) + "\n"


def _finishing(run_id: str, finish: ToFinish | None) -> list[str]:
    """How to finish the run from Prefect (a deployment's run, say): the flow again, with the
    run's id among its parameters."""
    if finish is None:
        return []
    again = f"the flow run again with the parameter `run_id` set to `{run_id}`"
    lines = finish.sentences(
        again[:1].upper() + again[1:],
        lambda budget: f"{again} and `overrides` holding `limits.budget_usd: {budget:.2f}`",
    )
    return [part for line in lines for part in (line, "")]  # (each a paragraph)


def _cell(text: str) -> str:
    """Text as one markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
