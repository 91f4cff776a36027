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
import io
import json
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from soundpatch import preview
from soundpatch.humanize import duration
from soundpatch.outcome import STATUSES, Outcome

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
        ("provider", str(summary.get("provider", ""))),
        ("wall time", duration(summary.get("wall_seconds"))),
        ("throughput", _per_minute(summary.get("results_per_minute"))),
        ("prediction latency", _latency(summary)),
        ("retries", str(summary.get("retries", 0))),
        ("reused (no cost)", str(by_status.get("skipped_done", 0))),
        ("flagged by checks", str(flagged)),
    ]
    if summary.get("report_uri"):
        facts.append(("report in bucket", str(summary["report_uri"])))
    table = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
    notes = "".join(f'<p class="note">{esc(str(n))}</p>' for n in summary.get("notes", []))
    more = ""
    if len(outcomes) > with_media and with_media:
        more = (
            f'<p class="note">Waveforms and players are shown for {with_media} of {len(outcomes)} results '
            "(flagged ones first); every card links to its output.</p>"
        )
    return f'<div class="tiles">{tiles}</div><table class="facts">{table}</table>{notes}{more}'


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
    "prompt",
    "seed",
    "provider",
    "cost_usd",
    "output",
    "prediction_id",
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
        p = preview.load(folder, o.row_id)
        if p is None:
            continue
        media[o.row_id] = {
            "image": _data_uri("image/png", _figure(p)),
            "before": _data_uri("audio/ogg", preview.ogg_bytes(p, "before")),
            "after": _data_uri("audio/ogg", preview.ogg_bytes(p, "after")),
            "caption": f"{p.start:.2f} s to {p.start + len(p.before) / p.rate:.2f} s; the region is shaded",
        }
    return media


WIDTH, WAVE_HEIGHT, SPEC_HEIGHT = 360, 56, 80
_BACKGROUND = np.array([1.0, 1.0, 1.0])
_REGION = np.array([0.99, 0.93, 0.75])
_INKS = (np.array([0.12, 0.37, 0.66]), np.array([0.09, 0.41, 0.17]))  # before blue, after green


def _figure(p: preview.Preview) -> bytes:
    """Before | after: waveform over spectrogram, the region shaded, as one small PNG.

    Drawn straight into pixels (matplotlib's colormap and PNG writer, no figure layout): a
    hundred cards render in about a second instead of a minute."""
    import matplotlib  # noqa: PLC0415 - only when a report has pictures to draw
    import matplotlib.image  # noqa: PLC0415

    peak = max(float(np.abs(p.before).max(initial=0)), float(np.abs(p.after).max(initial=0)), 1e-3)
    n = max(len(p.before), 1)
    lo, hi = (round(p.region[0] * p.rate * WIDTH / n), round(p.region[1] * p.rate * WIDTH / n))
    hi = max(hi, lo + 1)
    spectra = [_spectrogram(x) for x in (p.before, p.after)]
    top = max(float(s.max(initial=-200)) for s in spectra)
    panels = []
    for x, spectrum, ink in zip((p.before, p.after), spectra, _INKS, strict=True):
        wave = _waveform(x, peak, ink, lo, hi)
        spec = matplotlib.colormaps["magma"](np.clip((spectrum - (top - 90)) / 90, 0, 1))[..., :3]
        spec[:, max(0, lo - 1) : lo + 1] = _REGION
        spec[:, hi - 1 : hi + 1] = _REGION
        panels.append(np.vstack([wave, np.ones((4, WIDTH, 3)), spec]))
    image = np.hstack([panels[0], np.ones((panels[0].shape[0], 12, 3)), panels[1]])
    buf = io.BytesIO()
    matplotlib.image.imsave(buf, image, format="png")
    return buf.getvalue()


def _waveform(x: np.ndarray, peak: float, ink: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Min/max envelope per pixel column, region shaded."""
    image = np.tile(_BACKGROUND, (WAVE_HEIGHT, WIDTH, 1))
    image[:, lo:hi] = _REGION
    if len(x) == 0:
        return image
    edges = np.linspace(0, len(x), WIDTH + 1).astype(int)
    edges[1:] = np.maximum(edges[1:], edges[:-1] + 1)
    edges = np.minimum(edges, len(x))
    starts = np.minimum(edges[:-1], len(x) - 1)
    low = np.minimum.reduceat(x, starts)
    high = np.maximum.reduceat(x, starts)
    level = peak * (1 - 2 * np.arange(WAVE_HEIGHT) / (WAVE_HEIGHT - 1))[:, None]  # top row = +peak
    half_pixel = peak / (WAVE_HEIGHT - 1)
    ink_mask = (level >= low[None, :] - half_pixel) & (level <= high[None, :] + half_pixel)
    image[ink_mask] = ink
    return image


def _spectrogram(x: np.ndarray, nfft: int = 512) -> np.ndarray:
    """dB magnitudes, SPEC_HEIGHT rows (low frequencies at the bottom) by WIDTH columns."""
    if len(x) < nfft:
        x = np.pad(x, (0, nfft - len(x)))
    centres = np.linspace(0, len(x) - nfft, WIDTH).astype(int)
    frames = x[centres[:, None] + np.arange(nfft)[None, :]] * np.hanning(nfft)[None, :]
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (WIDTH, nfft/2+1)
    rows = np.linspace(0, power.shape[1], SPEC_HEIGHT + 1).astype(int)
    binned = np.add.reduceat(power, rows[:-1], axis=1) / np.maximum(np.diff(rows), 1)
    return (10 * np.log10(binned + 1e-12)).T[::-1]


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
