"""Numbers as people read them in summaries and reports."""

from __future__ import annotations


def duration(seconds: float | None) -> str:
    """`12.3 s`, `4 min 05 s`, `2 h 07 min`; `-` when unknown."""
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def plural(count: int, noun: str) -> str:
    """`1 more row`, `3 more rows`: the count and its noun, plural when it is not one."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def some_rows(rows: list[str], shown: int = 3) -> str:
    """`a, b, c and 13 more rows`: the first rows of a list, and how many more."""
    return ", ".join(rows[:shown]) + (f" and {plural(len(rows) - shown, 'more row')}" if len(rows) > shown else "")


def named_runs(runs: dict[str, int]) -> str:
    """`run night-1`, `runs a, b, c and 2 more`: the runs a count is kept by."""
    named = sorted(runs)
    shown = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
    return f"run{'s' if len(named) > 1 else ''} {shown}"


def size(nbytes: float) -> str:
    """`812 kB`, `64 MB`, `1.3 GB` (decimal units, as the size limits are given)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= scale:
            value = nbytes / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{nbytes:.0f} B"


def over_limit(what: str, max_bytes: int, nbytes: float | None = None) -> str:
    """`x.wav is 3000 MB, over the 2048 MB limit`: in the MB the limits are set in
    (`storage.max_input_mb`: 2**20 bytes), so that the limit reads as it was set."""
    limit = f"the {_mb(max_bytes)} MB limit (storage.max_input_mb)"
    return f"{what} is over {limit}" if nbytes is None else f"{what} is {_mb(nbytes)} MB, over {limit}"


def _mb(nbytes: float) -> str:
    value = nbytes / 2**20
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def counts_by_name(counts: dict[str, int], first: str, noun: str = "") -> str:
    """`first` where `counts` names nothing else; otherwise each name with its count, `first`
    first: `eachlabs: 2, local: 7` (with `noun`: `eachlabs: 2 rows, local: 7 rows`)."""
    if not set(counts) - {first}:
        return first
    ordered = sorted(counts.items(), key=lambda item: (item[0] != first, item[0]))
    return ", ".join(f"{name}: {plural(count, noun) if noun else count}" for name, count in ordered)
