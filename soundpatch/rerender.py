"""`soundpatch report RUN_ID`: a run's report made again from its journal (this machine's,
with what its copy in the output bucket knows more of; or the copy alone, for a run made on
another machine), in the order and with the notes of the report the run wrote as it ended,
and saying what a run that was killed has out: paid for, not in its spent."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from soundpatch.config import Config
from soundpatch.errors import RowError, SoundpatchError
from soundpatch.humanize import plural
from soundpatch.journal import (
    JOURNAL_FILE,
    latest_outcomes,
    latest_runs,
    lines_here,
    merge,
    parse,
    prediction_seconds,
)
from soundpatch.journal_copy import JournalCopy
from soundpatch.locks import run_going
from soundpatch.outcome import Outcome, to_finish
from soundpatch.past_runs import money_out
from soundpatch.report import parse_report, publish_reports, summarize, write_reports
from soundpatch.s3 import S3, S3Uri
from soundpatch.storage import open_store

Say = Callable[[str], None]  # a line for the terminal


def rerender(run_id: str, run_dir: Path, cfg: Config, s3: S3, say: Say) -> tuple[list[Outcome], dict[str, Any]]:
    """The run's outcomes and summary, its report files written again (run_dir, and next to
    the outputs in a bucket); raises SoundpatchError when no journal of it is found."""
    here = (run_dir / JOURNAL_FILE).exists()
    events = list(
        _journal_here(run_id, run_dir, cfg, s3, say) if here else _journal_copy_alone(run_id, run_dir, cfg, s3, say)
    )
    rows = latest_outcomes(events)
    outcomes = [Outcome.from_dict(r) for r in rows.values()]
    meta: dict[str, Any] = {
        "run_id": run_id,
        "budget_usd": cfg.limits.budget_usd,
        "provider": cfg.provider.name,
        "output_uri": cfg.output.uri,
    }
    earlier = _earlier_report(run_dir, cfg, run_id, s3)
    if earlier is not None:
        previous_rows, previous = earlier
        meta.update({k: v for k, v in previous.items() if k not in ("by_status", "spent_usd", "results")})
        order = {o.row_id: i for i, o in enumerate(previous_rows)}
        outcomes.sort(key=lambda o: order.get(o.row_id, len(order)))
    summary = summarize(outcomes, meta, prediction_seconds(events))
    # (Of a run made elsewhere, whether it goes on there is not known here.)
    stopped = _stopped_with_money_out(events, cfg, run_id) if here and not run_going(run_dir) else ""
    # Said anew each time (an earlier rendering's may be out of date): the run went on since.
    notes = [n for n in summary.get("notes", []) if not n.startswith(_STOPPED.format(run_id=run_id))]
    summary["notes"] = [*notes, stopped] if stopped else notes
    finish = to_finish(outcomes, summary["spent_usd"], cfg.provider.price_of)
    summary["to_finish"] = asdict(finish)
    if here:
        publish_reports(run_dir, outcomes, summary, open_store(cfg.output.uri, s3))
    else:  # the report in the bucket is the one its machine made, with its cards' pictures: kept
        write_reports(run_dir, outcomes, summary)
    return outcomes, summary


def _stopped_with_money_out(events: list[dict[str, Any]], cfg: Config, run_id: str) -> str:
    """What a run that stopped before its rows' outcomes has out: paid for and not in the
    report's spent (which counts outcomes); "" when nothing is."""
    out = money_out(events, cfg)
    if not out.rows:
        return ""
    parts = []
    if out.to_collect:
        parts.append(f"{plural(out.to_collect, 'row')} with a prediction paid for and not collected")
    if out.in_doubt:
        parts.append(f"{plural(out.in_doubt, 'row')} whose create went out with no answer (it may exist)")
    return (
        f"{_STOPPED.format(run_id=run_id)}{' and '.join(parts)}, about ${out.price_usd:.2f} at price_usd, not in the "
        f"spent above; the same command with --run-id {run_id} collects what was paid for, at no new cost."
    )


_STOPPED = "Run {run_id} stopped before it finished: "


def _earlier_report(run_dir: Path, cfg: Config, run_id: str, s3: S3) -> tuple[list[Outcome], dict[str, Any]] | None:
    """The report the run wrote as it ended (its rows' order, its wall time and notes): in
    the run folder, or next to the outputs in a bucket; None if it wrote none (it crashed)."""
    if (run_dir / "report.json").exists():
        return parse_report((run_dir / "report.json").read_bytes())
    if not cfg.output.uri.startswith("s3://"):
        return None
    try:
        data = s3.get(S3Uri.parse(cfg.output.uri).child(f"{run_id}/report.json"), 64 << 20)
    except RowError:
        return None
    return parse_report(data) if data else None


def _journal_here(run_id: str, run_dir: Path, cfg: Config, s3: S3, say: Say) -> Iterator[dict[str, Any]]:
    """This machine's journal of the run, with what its copy in the output bucket knows more
    of (another machine went on with the run, or this one's disk filled up under it)."""
    here = lines_here(run_dir)
    if not cfg.output.uri.startswith("s3://"):
        return parse(here)
    copy = JournalCopy(s3, S3Uri.parse(cfg.output.uri), run_id)
    try:
        merged, rows = merge(here, copy.lines())
    except RowError as exc:
        say(
            f"note: The journal's copy in the bucket could not be read ({exc}); the report is made from this "
            "machine's journal alone."
        )
        return parse(here)
    if rows:
        say(
            f"The journal's copy in the bucket knew more of {plural(len(rows), 'row')} than this machine's journal: "
            "the report is made from both."
        )
    return parse(merged)


def _journal_copy_alone(run_id: str, run_dir: Path, cfg: Config, s3: S3, say: Say) -> Iterator[dict[str, Any]]:
    """The journal of a run made on another machine (a worker): its copy in the output
    bucket. Only read: written here, it would be a stale journal of a run that may still go
    on elsewhere."""
    made = run_dir.is_dir()  # made, then stopped before its first row was written down
    if made:
        where = f"Run {run_id!r} recorded nothing in {run_dir} (it stopped before its first row began)"
    else:
        where = f"No run {run_id!r} in {Path(cfg.runs_dir)} (looked for {run_dir})"
    if not cfg.output.uri.startswith("s3://"):  # no bucket to look in: the runs that are here
        latest = [] if made else latest_runs(Path(cfg.runs_dir).expanduser())[:3]
        raise SoundpatchError(f"{where}; the latest there: {', '.join(latest)}." if latest else f"{where}.")
    copy = JournalCopy(s3, S3Uri.parse(cfg.output.uri), run_id)
    try:
        lines = copy.lines()
    except RowError as exc:
        raise SoundpatchError(f"{where}, and its journal's copy in the bucket could not be read ({exc}).") from None
    if not lines:
        raise SoundpatchError(f"{where}, nor in the bucket (looked for {copy.folder}).")
    say(f"No journal of run {run_id} here: the report is made from its copy in the bucket ({copy.folder}).")
    return parse(lines)
