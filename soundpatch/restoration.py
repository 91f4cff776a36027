"""The restoration manifest: a row filling each dropout and click found in an archive.

`soundpatch detect` finds them (dropouts.py, clicks.py) and writes this manifest;
`soundpatch run` fills them.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import NamedTuple

from soundpatch.edits import MAX_DAMAGED_SECONDS, spans_for_a_model

# A click's span is where its prediction error rose over the threshold (clicks.py); its
# quieter tails are still there. Rebuilding 0.25 ms more each side restored crackle 1-6 dB
# better (SNR over the rows, music and voices) than the spans as found, and no worse at 80
# ticks a second; 0.5 ms was worse on music.
CLICK_PAD_SECONDS = 0.00025
# For the local engine, rows of damaged spans this close are one row, of up to this long (_rows).
JOIN_SPANS_SECONDS = 1.0
ROW_OF_SPANS_SECONDS = 5.0
# For a hosted model, rows this long in all are one row: it generates a second of its clip at
# the least (its mask is whole seconds), so one prediction makes what each would have made.
ROW_FOR_A_MODEL_SECONDS = 1.0


@dataclass(frozen=True)
class Damage:
    start: float  # seconds
    end: float
    recording_seconds: float  # how long the recording it is in is
    kind: str = "dropout"  # or "click"


def restoration_manifest(
    found: Iterable[tuple[str, Damage]],
    folder: str | None,
    prompt: str,
    margin_seconds: float,
    join_spans: bool = False,
    spans_provider: str = "",
    join_for_a_model: bool = False,
) -> str:
    """CSV rows filling `found` ((input, damage) pairs).

    Each region is widened by `margin_seconds` on each side, so that the splice's
    crossfades blend real audio, not the silence or the click; damage whose widened
    regions meet is one row. A row of clicks and short dropouts also names them (`damaged`):
    the local engine rebuilds those spans alone, where a hosted model replaces the whole
    region. With `join_spans` (for the local engine), such rows near each other are one row
    too (`_rows`). With `spans_provider`, those rows name it in a `provider` column (the local
    engine, where the others go to a hosted model: it mends them for nothing). With
    `join_for_a_model`, rows for a hosted model within ROW_FOR_A_MODEL_SECONDS in all are one
    row, naming its damage as spans (its audio goes into those and their crossfades alone:
    edits.spans_for_a_model); with `join_spans` too, those of a longer dropout alone (and the
    clicks and short dropouts between two of them). Local inputs are written relative to
    `folder`, where the manifest goes (a manifest's paths are read relative to it), or whole
    where it has none here (it goes to a bucket). Each
    recording's repairs go into one file, under the run's folder at the recording's place in
    the archive: `take.wav` of two albums stays two files."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    routed = ["provider"] if spans_provider else []
    writer.writerow(["id", "input", "start", "end", "damaged", *routed, "prompt", "note", "output"])
    by_source = _by_source(found)
    places = _places(list(by_source))
    taken: set[str] = set()
    for source, damage in by_source.items():
        for group, start, end in _rows(damage, margin_seconds, join_spans, join_for_a_model):
            first = group[0]
            row_id = base = f"{PurePosixPath(source).stem}-{first.kind}-{first.start:.3f}s"
            n = 1
            while row_id in taken:
                n += 1
                row_id = f"{base}-{n}"
            taken.add(row_id)
            shown = _named(source, folder)
            spans = _spans(group, start, end)
            damaged = _shown(spans if spans is not None else _model_spans(group, start, end, margin_seconds))
            writer.writerow(
                [
                    row_id,
                    shown,
                    f"{start:.4f}",
                    f"{end:.4f}",
                    damaged,
                    *([spans_provider if spans is not None else ""] if spans_provider else []),
                    prompt,
                    f"{_note(group)} at {first.start:.3f} s",
                    places[source],
                ]
            )
    return text.getvalue()


class RowCounts(NamedTuple):
    rows: int
    span_rows: int  # rows naming damaged spans the local engine can rebuild alone
    span_rows_apart: int  # how many rows their damage would be, none joined but what meets
    short_in_model_rows: int  # clicks and short dropouts in the other rows (a model's)


def row_counts(
    found: Iterable[tuple[str, Damage]], margin_seconds: float, join_spans: bool = False, join_for_a_model: bool = False
) -> RowCounts:
    """How many rows `restoration_manifest` writes for `found`, how many of them name damaged
    spans the local engine can rebuild alone, and how many clicks and short dropouts the
    others hold (beside a longer dropout, or between two that are one row for a model)."""
    rows = spans = apart = short = 0
    for damage in _by_source(found).values():
        for group, start, end in _rows(damage, margin_seconds, join_spans, join_for_a_model):
            rows += 1
            if _spans(group, start, end) is not None:
                spans += 1
                apart += len(_rows(group, margin_seconds))
            else:
                short += sum(_fit([d], start, end) for d in group)
    return RowCounts(rows, spans, apart, short)


def _by_source(found: Iterable[tuple[str, Damage]]) -> dict[str, list[Damage]]:
    by_source: dict[str, list[Damage]] = {}
    for source, d in found:
        by_source.setdefault(source, []).append(d)
    return by_source


def _shown(spans: list[tuple[float, float]]) -> str:
    """A row's `damaged` column."""
    return " ".join(f"{a:.5f}-{b:.5f}" for a, b in spans)


def _model_spans(group: list[Damage], start: float, end: float, margin: float) -> list[tuple[float, float]]:
    """The spans of a row with a longer dropout, for a model's audio to go into: none where,
    with their crossfades, they are all of the row (a row of damage whose regions meet)."""
    spans = [(max(start, a), min(end, b)) for a, b in map(_padded, group)]
    return spans if spans_for_a_model(spans, start, end, margin) else []


def _spans(group: list[Damage], start: float, end: float) -> list[tuple[float, float]] | None:
    """The damaged spans of a row (start..end), for the local engine to rebuild alone, keeping
    the sound around and between them: each click's, CLICK_PAD_SECONDS wider each side, and
    each dropout's (digital silence, the sound cut at both its edges: those are sound). None
    where one is longer than a span may be (a dropout of over 20 ms): that row's region is
    rebuilt whole, from a passage elsewhere where it is long. Rebuilt alone, a dropout of 5
    to 20 ms came back 3.5 to 24 dB closer to the clean audio than with the region's 10 ms
    margins rebuilt too (bench/local_engine.py)."""
    spans = []
    for d in group:
        a, b = _padded(d)
        a, b = max(start, a), min(end, b)
        if b - a > MAX_DAMAGED_SECONDS + 1e-9:
            return None
        spans.append((a, b))
    return spans


def _padded(d: Damage) -> tuple[float, float]:
    """The span of `d` before a row's region cuts it: a click's with its pad, to 10 µs outwards."""
    pad = CLICK_PAD_SECONDS if d.kind == "click" else 0.0
    a = math.floor(round((d.start - pad) * 100_000, 3)) / 100_000
    return a, math.ceil(round((d.end + pad) * 100_000, 3)) / 100_000


def _fit(damage: Iterable[Damage], start: float, end: float) -> bool:
    """Whether each of `damage` is a span in a row of start..end (`_spans` is not None)."""
    return all(min(end, b) - max(start, a) <= MAX_DAMAGED_SECONDS + 1e-9 for a, b in map(_padded, damage))


def _note(group: list[Damage]) -> str:
    """`dropout of 50 ms`, `click of 0.9 ms`, `2 dropouts and 1 click, 61 ms in all,`."""
    ms = 1000 * sum(d.end - d.start for d in group)
    shown = f"{ms:.0f}" if ms >= 2 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"
    if len(group) == 1:
        return f"{group[0].kind} of {shown} ms"
    kinds = {kind: sum(d.kind == kind for d in group) for kind in dict.fromkeys(d.kind for d in group)}
    counted = " and ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in kinds.items())
    return f"{counted}, {shown} ms in all,"


def _rows(
    damage: list[Damage], margin: float, join_spans: bool = False, join_for_a_model: bool = False
) -> list[tuple[list[Damage], float, float]]:
    """The damage of one recording a row each: (damage, start, end), the region as written
    (rounded outwards to 0.1 ms). Damage whose widened regions meet is one row; so is damage
    whose regions meet only once rounded. Apart, 16.28685 s ended one row at 16.2869 and began
    the next at 16.2868: regions that overlap, which one file cannot hold (the second row was
    invalid, its click left in).

    With `join_spans`, rows of damaged spans alone (clicks, short dropouts) within
    JOIN_SPANS_SECONDS of each other are one row too, of up to ROW_OF_SPANS_SECONDS: the
    local engine rebuilds their spans and keeps the sound between, so a longer row changes
    nothing of the result, and crackle is a few rows a minute instead of a thousand (each a
    task, a report card and an excerpt of its region and a second each side).

    With `join_for_a_model`, rows within ROW_FOR_A_MODEL_SECONDS in all are one row too (with
    `join_spans`, rows of a longer dropout alone, with the clicks and short dropouts between
    them, `_across_clicks`: the others are the local engine's): a hosted model makes a second
    at the least whatever the row, and its audio goes into the damage alone, so one
    prediction does the work of several."""
    rows: list[_Row] = []
    for group in _meeting(damage, margin):
        start = max(0.0, math.floor(round((group[0].start - margin) * 10_000, 3)) / 10_000)
        last = max(d.end for d in group)  # (not the last to begin: a click found inside a dropout ends first)
        end = min(group[-1].recording_seconds, math.ceil(round((last + margin) * 10_000, 3)) / 10_000)
        row = rows[-1] if rows else None
        if row is not None and (
            start < row.end
            or (join_spans and row.joins(group, start, end))
            or (join_for_a_model and row.shares_a_prediction(group, start, end, join_spans))
        ):
            row.take(group, end)
        elif join_spans and join_for_a_model and _across_clicks(rows, group, start, end):
            between = rows.pop()  # the local engine's clicks between two of the model's dropouts
            rows[-1].take(between.group, between.end)
            rows[-1].take(group, end)
        else:
            rows.append(_Row(list(group), start, end, _fit(group, start, end), list(group)).cut())
    return [(row.group, row.start, row.end) for row in rows]


def _across_clicks(rows: list[_Row], group: list[Damage], start: float, end: float) -> bool:
    """Whether `group` (start..end), a longer dropout, and the model's row before the last
    row, of clicks and short dropouts (the local engine's) between the two, are one row for
    the model within ROW_FOR_A_MODEL_SECONDS in all: the clicks go to the model with them.
    Apart, the model made two seconds for two dropouts in one (crackle between dropouts
    kept every pair apart), at twice the price."""
    if len(rows) < 2 or not rows[-1].spans or rows[-2].spans or end - rows[-2].start > ROW_FOR_A_MODEL_SECONDS:
        return False
    return not _fit(group, start, end)


@dataclass
class _Row:
    """A row as `_rows` makes it, group by group. Joining rows asks whether each's damage is
    a span; asked of a whole growing row at each join, an hour of dense crackle took 19 s
    (quadratic in a row's damage). A row's region widening only lengthens its damage's
    spans, and only theirs that it cut short (`tail`): those and a new group's are asked."""

    group: list[Damage]
    start: float
    end: float
    spans: bool  # whether each of its damage is a span in start..end (`_spans`)
    tail: list[Damage]  # its damage start..end cuts short at its end

    def joins(self, group: list[Damage], start: float, end: float) -> bool:
        """Whether this row and then `group` (start..end), rows of damaged spans alone, are one row."""
        near = start - self.end <= JOIN_SPANS_SECONDS and end - self.start <= ROW_OF_SPANS_SECONDS
        return near and self.spans and _fit(group, start, end)

    def shares_a_prediction(self, group: list[Damage], start: float, end: float, spans_apart: bool) -> bool:
        """Whether this row and then `group` (start..end) are one row for a hosted model; with
        `spans_apart`, rows of damaged spans alone are not (the local engine's)."""
        near = end - self.start <= ROW_FOR_A_MODEL_SECONDS
        return near and not (spans_apart and (self.spans or _fit(group, start, end)))

    def take(self, group: list[Damage], end: float) -> None:
        """`group` and the region up to `end` joined to this row."""
        self.spans = self.spans and _fit(self.tail + group, self.start, end)
        self.group.extend(group)
        self.tail += group
        self.end = end
        self.cut()

    def cut(self) -> _Row:
        """Kept in `tail`: the damage that the region, as it ends now, cuts short."""
        self.tail = [d for d in self.tail if _padded(d)[1] > self.end]
        return self


def _meeting(damage: list[Damage], margin: float) -> list[list[Damage]]:
    """The damage, in order, in groups whose regions (each widened by `margin`) meet."""
    groups: list[list[Damage]] = []
    ends = -math.inf  # where the last group's damage ends, the latest of it
    for d in sorted(damage, key=lambda d: d.start):
        if groups and d.start - margin <= ends + margin:
            groups[-1].append(d)
        else:
            groups.append([d])
            ends = -math.inf
        ends = max(ends, d.end)
    return groups


def _named(source: str, folder: str | None) -> str:
    """An input as the manifest names it: a URI as it is; a local file relative to `folder`,
    or whole without one."""
    if "://" in source:
        return source
    return os.path.relpath(source, folder) if folder else os.path.abspath(source)


def _places(sources: list[str]) -> dict[str, str]:
    """Each source's output template: `{run_id}/`, its folder below what all the sources
    (local ones, or objects of one bucket) share, and `{stem}`."""
    where = {source: _where(source) for source in sources}
    folders: dict[str, list[str]] = {}
    for scheme, folder in where.values():
        folders.setdefault(scheme, []).append(folder)
    roots = {scheme: os.path.commonpath(paths) or "." for scheme, paths in folders.items()}
    places = {}
    for source, (scheme, folder) in where.items():
        below = os.path.relpath(folder, roots[scheme]).replace(os.sep, "/")
        below = "" if below == "." else below.replace("{", "{{").replace("}", "}}") + "/"
        places[source] = "{run_id}/" + below + "{stem}"
    return places


def _where(source: str) -> tuple[str, str]:
    """(scheme, folder) of an input: ("s3", "bucket/albums/one"), ("", "/archive/one")."""
    if "://" in source:
        scheme, rest = source.split("://", 1)
        return scheme, str(PurePosixPath(rest).parent)
    return "", os.path.dirname(os.path.abspath(source))
