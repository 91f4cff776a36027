"""The run's report: report.csv (one line per result), report.json (summary + rows), report.html.

Nothing secret goes in: rows carry the manifest's own columns and what the provider
returned, never configuration values such as key names' contents.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from soundpatch.errors import SoundpatchError
from soundpatch.outcome import REPORT_COLUMNS, STATUSES, Outcome
from soundpatch.storage import OutputStore, atomic_write

BASE_COLUMNS = list(REPORT_COLUMNS)


def summarize(outcomes: Sequence[Outcome], meta: dict[str, Any]) -> dict[str, Any]:
    counts = Counter(o.status for o in outcomes)
    spent = round(sum(o.cost_usd for o in outcomes), 6)
    ran = [o.seconds for o in outcomes if o.status in ("succeeded", "failed") and o.seconds > 0]
    wall = float(meta.get("wall_seconds") or 0.0)
    summary = {
        **meta,
        "results": len(outcomes),
        "by_status": {s: counts.get(s, 0) for s in STATUSES},
        "spent_usd": spent,
        "p50_row_seconds": round(float(pd.Series(ran).quantile(0.5)), 3) if ran else None,
        "p95_row_seconds": round(float(pd.Series(ran).quantile(0.95)), 3) if ran else None,
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
    return pd.DataFrame(rows, columns=BASE_COLUMNS + extra_cols)


def write_reports(run_dir: Path, outcomes: Sequence[Outcome], summary: dict[str, Any]) -> dict[str, Path]:
    df = frame(outcomes)
    paths = {
        "csv": run_dir / "report.csv",
        "json": run_dir / "report.json",
        "html": run_dir / "report.html",
    }
    atomic_write(paths["csv"], df.to_csv(index=False).encode("utf-8"))
    doc = {"summary": summary, "rows": [o.to_dict() for o in outcomes]}
    atomic_write(paths["json"], json.dumps(doc, indent=2, default=str).encode("utf-8"))
    atomic_write(paths["html"], render_html(df, summary).encode("utf-8"))
    return paths


REPORT_TYPES = {"csv": "text/csv; charset=utf-8", "json": "application/json", "html": "text/html; charset=utf-8"}


def publish_reports(
    run_dir: Path, outcomes: Sequence[Outcome], summary: dict[str, Any], store: OutputStore
) -> dict[str, Path]:
    """Write the reports in the run folder and, when the outputs are remote, next to them
    under `<output.uri>/<run_id>/`. A report that cannot be copied is noted, not fatal:
    the run folder still has it."""
    if store.remote:
        summary["report_uri"] = store.uri(f"{summary['run_id']}/report.html")
    paths = write_reports(run_dir, outcomes, summary)
    if not store.remote:
        return paths
    try:
        for kind, path in paths.items():
            store.put_file(f"{summary['run_id']}/{path.name}", path.read_bytes(), REPORT_TYPES[kind])
    except SoundpatchError as exc:
        summary.pop("report_uri", None)
        summary.setdefault("notes", []).append(f"The report was not copied next to the outputs: {exc}")
        paths = write_reports(run_dir, outcomes, summary)
    return paths


def load_report(run_dir: Path) -> tuple[list[Outcome], dict[str, Any]]:
    doc = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    return [Outcome.from_dict(r) for r in doc["rows"]], doc["summary"]


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2rem;color:#222}
h1{font-size:1.4rem}table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:.35rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4;position:sticky;top:0}.succeeded{color:#17692c}.failed,.invalid{color:#b00020}
.skipped_budget{color:#9a6700}.skipped_done{color:#555}.cards{display:flex;gap:1rem;flex-wrap:wrap}
.card{border:1px solid #ddd;border-radius:6px;padding:.6rem 1rem}.note{color:#555}
"""

_JS = """
document.getElementById('status').addEventListener('change', e => {
  const v = e.target.value;
  document.querySelectorAll('tbody tr').forEach(tr => {
    tr.style.display = (!v || tr.dataset.status === v) ? '' : 'none';
  });
});
"""


def render_html(df: pd.DataFrame, summary: dict[str, Any]) -> str:
    esc = html.escape
    cards = "".join(
        f'<div class="card"><b>{esc(str(v))}</b><br>{esc(k.replace("_", " "))}</div>'
        for k, v in summary.get("by_status", {}).items()
    )
    money = (
        f"spent ${summary.get('spent_usd', 0):.2f} of ${summary.get('budget_usd', 0):.2f} budget"
        f" &middot; provider {esc(str(summary.get('provider', '')))}"
        f" &middot; wall time {summary.get('wall_seconds', 0):.1f} s"
    )
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in summary.get("notes", []))
    shown = [c for c in df.columns if c not in ("method",)]
    head = "".join(f"<th>{esc(c)}</th>" for c in shown)
    body = []
    for _, row in df.iterrows():
        status = str(row["status"])
        cells = "".join(f'<td class="{esc(status) if c == "status" else ""}">{esc(_cell(row[c]))}</td>' for c in shown)
        body.append(f'<tr data-status="{esc(status)}">{cells}</tr>')
    options = "".join(f'<option value="{s}">{s}</option>' for s in STATUSES)
    title = f"soundpatch run {esc(str(summary.get('run_id', '')))}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{_CSS}</style></head><body>
<h1>{title}</h1>
<div class="cards">{cards}</div><p>{money}</p>{notes}
<p><label>Show <select id="status"><option value="">all</option>{options}</select></label></p>
<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>
<script>{_JS}</script></body></html>
"""


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
