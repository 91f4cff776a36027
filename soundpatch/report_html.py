"""report.html: one self-contained page a person can read at a glance.

The summary is on top (results by status, the money, time, throughput, latency,
retries, reuse, flagged checks); below it one card per result, filterable by status,
by "flagged only" and by text, fifty to a page so that a 10,000-result run opens
without freezing. Cards are built by the page's script from a JSON block (text is
set with textContent, never parsed as HTML). The first MEDIA_CARDS results with a
preview (flagged ones first) carry before/after waveforms and spectrograms of the
region with a second of context, and players for both; the rest link to their output.

Everything is inline (CSS, script, images and audio as data: URIs), so the file opens
from disk or from a bucket with no server.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from soundpatch import preview
from soundpatch.humanize import counts_by_name, duration, plural, some_rows
from soundpatch.outcome import STATUSES, Outcome, ToFinish, by_reason

MEDIA_CARDS = preview.KEEP
PAGE_SIZE = 50


def render(outcomes: Sequence[Outcome], summary: dict[str, Any], previews_dir: Path | None) -> str:
    rows = [_row(o) for o in outcomes]
    media = _media(outcomes, previews_dir) if previews_dir is not None else {}
    data = {"rows": rows, "media": media, "pageSize": PAGE_SIZE, "statuses": list(STATUSES)}
    title = f"soundpatch run {html.escape(str(summary.get('run_id', '')))}"
    return _PAGE.format(
        title=title,
        css=_asset("report.css"),
        summary=_summary_html(summary, outcomes, len(media)),
        options="".join(f'<option value="{s}">{s}</option>' for s in STATUSES),
        data=_script_json(data),
        js=_asset("report.js"),
    )


# ---------------------------------------------------------------------- summary


def _providers(summary: dict[str, Any], outcomes: Sequence[Outcome]) -> str:
    """The run's provider; where rows named others (a manifest's `provider` column), each
    with the rows it made or failed: `eachlabs: 2 rows, local: 7 rows`."""
    made = Counter(o.provider for o in outcomes if o.provider and o.status in ("succeeded", "failed"))
    return counts_by_name(made, str(summary.get("provider", "")), "row")


def _summary_html(summary: dict[str, Any], outcomes: Sequence[Outcome], with_media: int) -> str:
    esc = html.escape
    by_status = summary.get("by_status", {})
    tiles = "".join(
        f'<div class="tile {s}"><b>{by_status.get(s, 0)}</b><span>{s.replace("_", " ")}</span></div>' for s in STATUSES
    )
    flagged = sum(1 for o in outcomes if o.checks not in ("", "ok"))
    facts = [
        ("spent", f"${summary.get('spent_usd', 0):.2f} of ${summary.get('budget_usd', 0):.2f} budget"),
        ("provider reported", f"${summary.get('provider_cost_usd', 0):.2f}"),
        ("provider", _providers(summary, outcomes)),
        ("wall time", duration(summary.get("wall_seconds"))),
        ("throughput", _per_minute(summary.get("results_per_minute"))),
        ("prediction latency", _latency(summary)),
        ("retries", str(summary.get("retries", 0))),
        ("reused (no cost)", str(by_status.get("skipped_done", 0))),
        ("flagged by checks", str(flagged)),
    ]
    if summary.get("report_uri"):
        facts.append(("report in bucket", str(summary["report_uri"])))
    if summary.get("index_uri"):
        facts.append(("dataset index", str(summary["index_uri"])))
    table = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
    notes = "".join(f'<p class="note">{esc(str(n))}</p>' for n in summary.get("notes", []))
    more = ""
    if len(outcomes) > with_media and with_media:
        more = (
            f'<p class="note">Waveforms and players are shown for {with_media} of {len(outcomes)} results '
            "(flagged ones first); every card links to its output.</p>"
        )
    finish = _finishing_html(summary)
    return (
        f'<div class="tiles">{tiles}</div><table class="facts">{table}</table>{_reasons_html(outcomes)}{finish}'
        f"{notes}{more}"
    )


def _finishing_html(summary: dict[str, Any]) -> str:
    """How to finish the run (outcome.to_finish): run it again with its run id."""
    run_id, manifest = summary.get("run_id", ""), summary.get("manifest") or "its manifest"
    again = f"soundpatch run {manifest} with the options it had and --run-id {run_id} (or the flow, run_id {run_id})"
    lines = ToFinish.of(summary).sentences(again, lambda budget: f"{again}, with a budget of ${budget:.2f},")
    return "".join(f'<p class="finish">{html.escape(line)}</p>' for line in lines)


def _reasons_html(outcomes: Sequence[Outcome], shown: int = 10) -> str:
    """Why results did not succeed, the most common reason first, with how many it ended
    and which (the first few: the Find box finds a row's card)."""
    reasons = by_reason(outcomes)
    if not reasons:
        return ""
    esc = html.escape
    lines = "".join(
        f'<tr><td class="count">{len(rows)}</td><td><span class="badge {status}">{status}</span> '
        f'{esc(reason)} <span class="rows">({esc(some_rows(rows))})</span></td></tr>'
        for status, reason, rows in reasons[:shown]
    )
    rest = sum(len(rows) for _, _, rows in reasons[shown:])
    if rest:
        others = f"for {plural(len(reasons) - shown, 'other reason')} (see the cards)"
        lines += f'<tr><td class="count">{rest}</td><td>{others}</td></tr>'
    return f'<table class="reasons"><caption>Why results did not succeed</caption>{lines}</table>'


def _per_minute(value: Any) -> str:
    return "-" if value is None else f"{value:g} results/min"


def _latency(summary: dict[str, Any]) -> str:
    p50, p95 = summary.get("p50_prediction_seconds"), summary.get("p95_prediction_seconds")
    if p50 is None:
        return "-"
    return f"p50 {p50:.2f} s, p95 {p95:.2f} s"


# ---------------------------------------------------------------------- cards


_CARD_FIELDS = (
    "row_id",
    "status",
    "input",
    "start",
    "end",
    "damaged",
    "prompt",
    "seed",
    "provider",
    "cost_usd",
    "output",
    "prediction_id",
    "method",
    "attempts",
    "error",
    "checks",
    "outside_max_diff",
    "seam_in",
    "seam_out",
    "loudness_delta_db",
    "clipped",
    "offset_ms",
    "reused_from",
    "combined",
    "seconds",
)


def _row(o: Outcome) -> dict[str, Any]:
    d = o.to_dict()
    row = {k: _plain(d.get(k)) for k in _CARD_FIELDS}
    row["extra"] = {str(k): str(v) for k, v in (o.extra or {}).items()}
    return row


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _media(outcomes: Sequence[Outcome], folder: Path) -> dict[str, dict[str, str]]:
    flagged = [o for o in outcomes if o.checks not in ("", "ok")]
    rest = [o for o in outcomes if o.checks in ("", "ok")]
    media: dict[str, dict[str, str]] = {}
    for o in flagged + rest:
        if len(media) >= MEDIA_CARDS:
            break
        m = preview.media(folder, o.row_id)
        if m is None:
            continue
        media[o.row_id] = {
            "image": _data_uri("image/png", m.picture),
            "before": _data_uri("audio/ogg", m.before),
            "after": _data_uri("audio/ogg", m.after),
            "caption": m.caption,
        }
    return media


def _data_uri(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode("ascii")


def _asset(name: str) -> str:
    return resources.files("soundpatch").joinpath("report_assets", name).read_text(encoding="utf-8")


def _script_json(data: Any) -> str:
    """JSON safe inside <script type="application/json">: no early </script>."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str)
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{title}</title><link rel="icon" href="data:,"><style>{css}</style></head><body>
<h1>{title}</h1>
{summary}
<div class="controls">
<label>Status <select id="status"><option value="">all</option>{options}</select></label>
<label><input type="checkbox" id="flagged"> flagged only</label>
<label>Find <input type="search" id="text" placeholder="row, prompt, input, error"></label>
<span id="page-info"></span>
</div>
<main id="cards"></main>
<div class="pager"><button id="prev">previous</button><button id="next">next</button></div>
<script type="application/json" id="report-data">{data}</script>
<script>{js}</script>
</body></html>
"""
