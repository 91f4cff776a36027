"""The run's report: report.csv (one line per result), report.json (summary + rows), report.html.

Nothing secret goes in: rows carry the manifest's own columns and what the provider
returned, never configuration values such as key names' contents.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from soundpatch import report_html
from soundpatch.disk_room import full_disk
from soundpatch.errors import SoundpatchError
from soundpatch.outcome import REPORT_COLUMNS, STATUSES, Outcome
from soundpatch.storage import OutputStore, atomic_write

BASE_COLUMNS = list(REPORT_COLUMNS)


def summarize(
    outcomes: Sequence[Outcome], meta: dict[str, Any], prediction_seconds: Sequence[float] = ()
) -> dict[str, Any]:
    """The run in numbers. `spent_usd` is what counts against the budget (creates in doubt
    included at list price); `provider_cost_usd` is what the provider itself reported."""
    counts = Counter(o.status for o in outcomes)
    ran = [o.seconds for o in outcomes if o.status in ("succeeded", "failed") and o.seconds > 0]
    wall = float(meta.get("wall_seconds") or 0.0)
    latency = pd.Series(list(prediction_seconds), dtype=float)
    summary = {
        **meta,
        "results": len(outcomes),
        "by_status": {s: counts.get(s, 0) for s in STATUSES},
        "spent_usd": round(sum(o.cost_usd for o in outcomes), 6),
        "provider_cost_usd": round(sum(o.provider_cost_usd for o in outcomes), 6),
        "retries": sum(max(0, o.attempts - 1) for o in outcomes),
        "flagged": sum(1 for o in outcomes if o.checks not in ("", "ok")),
        "p50_row_seconds": round(float(pd.Series(ran).quantile(0.5)), 3) if ran else None,
        "p95_row_seconds": round(float(pd.Series(ran).quantile(0.95)), 3) if ran else None,
        "p50_prediction_seconds": round(float(latency.quantile(0.5)), 3) if len(latency) else None,
        "p95_prediction_seconds": round(float(latency.quantile(0.95)), 3) if len(latency) else None,
        "results_per_minute": round(len(ran) / wall * 60, 1) if wall > 0 and ran else None,
    }
    return summary


def frame(outcomes: Sequence[Outcome]) -> pd.DataFrame:
    rows = []
    extra_cols: list[str] = []
    for o in outcomes:
        d = o.to_dict()
        extra = d.pop("extra") or {}
        for k in extra:
            if k not in extra_cols and k not in BASE_COLUMNS:
                extra_cols.append(k)
        rows.append({**d, **extra})
    table = pd.DataFrame(rows, columns=BASE_COLUMNS + extra_cols)
    for column in table.columns:
        # Whole numbers some rows lack (the seed of an invalid row) stay whole: pandas made
        # the column floats, and report.csv said "896505003.0".
        given = [row.get(column) for row in rows if row.get(column) is not None]
        if given and len(given) < len(rows) and all(type(v) is int for v in given):
            table[column] = table[column].astype("Int64")
    return table


def write_reports(run_dir: Path, outcomes: Sequence[Outcome], summary: dict[str, Any]) -> dict[str, Path]:
    return _write(run_dir, render_reports(run_dir, outcomes, summary))


def _write(run_dir: Path, docs: dict[str, bytes]) -> dict[str, Path]:
    paths = report_paths(run_dir)
    for kind, data in docs.items():
        atomic_write(paths[kind], data)
    return paths


def report_paths(run_dir: Path) -> dict[str, Path]:
    return {kind: run_dir / f"report.{kind}" for kind in REPORT_TYPES}


def render_reports(run_dir: Path, outcomes: Sequence[Outcome], summary: dict[str, Any]) -> dict[str, bytes]:
    """The report as CSV, JSON and HTML (whose cards play the previews in `run_dir`)."""
    doc = {"summary": summary, "rows": [o.to_dict() for o in outcomes]}
    return {
        "csv": frame(outcomes).to_csv(index=False).encode("utf-8"),
        "json": json.dumps(doc, indent=2, default=str).encode("utf-8"),
        "html": report_html.render(outcomes, summary, run_dir / "previews").encode("utf-8"),
    }


REPORT_TYPES = {"csv": "text/csv; charset=utf-8", "json": "application/json", "html": "text/html; charset=utf-8"}


def publish_reports(
    run_dir: Path, outcomes: Sequence[Outcome], summary: dict[str, Any], store: OutputStore
) -> dict[str, Path]:
    """Write the reports in the run folder and, when the outputs are remote, next to them
    under `<output.uri>/<run_id>/`. A report that cannot be copied is noted, not fatal:
    the run folder still has it. One the run folder cannot take (its disk is full) is
    noted too, and `summary["report_missing"]` set; it still goes next to remote outputs,
    and the run's outcomes are shown all the same."""
    if store.remote:
        summary["report_uri"] = store.uri(f"{summary['run_id']}/report.html")
    docs = render_reports(run_dir, outcomes, summary)
    try:
        paths = _write(run_dir, docs)
    except OSError as exc:  # its disk filled up, say
        why = full_disk(run_dir, exc) or exc.strerror or str(exc)
        paths, summary["report_missing"] = report_paths(run_dir), True
        summary.setdefault("notes", []).append(
            f"The report could not be written in {run_dir}: {why}; soundpatch report {summary['run_id']} writes "
            "it there from the run's journal once there is room."
        )
        docs = render_reports(run_dir, outcomes, summary) if store.remote else docs  # with that note
    if not store.remote:
        return paths
    try:
        for kind, data in docs.items():
            store.put_file(f"{summary['run_id']}/{paths[kind].name}", data, REPORT_TYPES[kind])
    except SoundpatchError as exc:
        summary.pop("report_uri", None)
        summary.setdefault("notes", []).append(f"The report was not copied next to the outputs: {exc}")
        if not summary.get("report_missing"):
            write_reports(run_dir, outcomes, summary)
    return paths


def parse_report(data: bytes) -> tuple[list[Outcome], dict[str, Any]]:
    """The rows and summary of a report.json."""
    doc = json.loads(data)
    return [Outcome.from_dict(r) for r in doc["rows"]], doc["summary"]
