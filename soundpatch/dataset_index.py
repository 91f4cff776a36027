"""A dataset's index: one CSV beside the results, listing each of them and what made it.

A nightly deployment grows a dataset in a bucket night by night, and what trains on it
wants one file saying what each result is: its prompt, its seed, the recording and region
it came from. Each run's report says so of that run's rows only. With `output.index` set
(`metadata.csv`, or `dataset/metadata.csv`), each run ends by adding its results to that
CSV, under `output.uri`: a line per result, named (`file_name`) relative to the CSV's own
folder, as Hugging Face's `audiofolder` reads a `metadata.csv`. A result given a name
another already had replaces that one's line; the lines of results a run did not touch
stay as they were. A result reused from an earlier run (`skipped_done`) is listed too, so a
line lost is back the next time its row runs.

Two runs ending at once on one index do not lose each other's lines: the CSV is written
only if it is still as it was read (a bucket's conditional PUT; a lock file on a folder),
else read again and merged again.
"""

from __future__ import annotations

import csv
import io
import posixpath
from collections.abc import Sequence
from typing import Any

from soundpatch.errors import SoundpatchError
from soundpatch.outcome import SKIPPED_DONE, SUCCEEDED, Outcome
from soundpatch.storage import OutputStore
from soundpatch.web import shown_input

COLUMNS = ("file_name", "prompt", "seed", "input", "start", "end", "row_id", "provider", "run_id", "checks")
MAX_INDEX_BYTES = 512 << 20  # some two million lines
TRIES = 8


def update(store: OutputStore, name: str, outcomes: Sequence[Outcome], run_id: str) -> str | None:
    """This run's results into the index `name` under the store; None when done, else a note
    saying why not (the results themselves are published all the same)."""
    base = store.uri(name)[: -len(posixpath.basename(name))]  # the CSV's folder, as results are named
    lines, made = [], set()
    for outcome in outcomes:
        line = _line(outcome, base, run_id) if outcome.status in (SUCCEEDED, SKIPPED_DONE) else None
        if line is not None:
            lines.append(line)
            if outcome.status == SUCCEEDED:
                made.add(line["file_name"])
    if not lines:
        return None
    try:
        for _ in range(TRIES):
            held = store.read_file(name, MAX_INDEX_BYTES)
            data = merged(held[0] if held else b"", lines, made)
            if store.put_file_if(name, data, "text/csv", held[1] if held else None):
                return None
    except (SoundpatchError, OSError, ValueError) as exc:
        why = str(exc).rstrip(".")
    else:
        why = f"other runs kept writing it ({TRIES} tries)"
    return (
        f"The dataset index {store.uri(name)} was not updated with this run's results: {why}; rerunning "
        f"with --run-id {run_id} adds them at no new cost."
    )


def _line(outcome: Outcome, base: str, run_id: str) -> dict[str, str] | None:
    """The index's line for a result (in the file rows of one recording share, where it went
    into one: combine.py), or None if it is not in the index's folder."""
    result = outcome.combined or outcome.output
    if not result or not result.startswith(base):
        return None
    values: dict[str, Any] = {
        "file_name": result[len(base) :],
        "prompt": outcome.prompt,
        "seed": outcome.seed,
        "input": shown_input(outcome.input),  # a URL without its query string: it may hold a token
        "start": outcome.start,
        "end": outcome.end,
        "row_id": outcome.row_id,
        "provider": outcome.provider,
        "run_id": run_id,
        "checks": outcome.checks,
    }
    for column, value in outcome.extra.items():
        values.setdefault(column, value)
    return {k: "" if v is None else (f"{v:g}" if isinstance(v, float) else str(v)) for k, v in values.items()}


def merged(old: bytes, lines: list[dict[str, str]], made: set[str]) -> bytes:
    """The index `old` with `lines` in, in order of file name. A file this run made (`made`)
    has its lines replaced by this run's (rows sharing one file have a line each); a result
    reused keeps the lines it has, and gets this run's where it has none."""
    kept: list[dict[str, str]] = []
    columns = list(COLUMNS)
    if old:
        reader = csv.DictReader(io.StringIO(old.decode("utf-8-sig")))
        if reader.fieldnames is None or "file_name" not in reader.fieldnames:
            raise ValueError("it has no file_name column, so it is not an index soundpatch wrote: name another one")
        columns += [c for c in reader.fieldnames if c not in columns]
        kept = [row for row in reader if row.get("file_name") not in made]
    listed = {row.get("file_name") for row in kept}
    new = [line for line in lines if line["file_name"] in made or line["file_name"] not in listed]
    for line in new:
        columns += [c for c in line if c not in columns]
    everything = sorted(kept + new, key=lambda row: row.get("file_name") or "")
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(everything)
    return out.getvalue().encode("utf-8")
