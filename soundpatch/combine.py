"""One file for the rows of one recording that name it: each row's region, from its result.

Restoration batches list a recording's defects one row each (a click, a dropout, a gap)
and want the recording back once, restored, not one copy per defect. Rows of one input
whose regions do not overlap may therefore name one output (`output: restored/{stem}`,
no `{row_id}`). Each row's own result is still made and kept, at
`restored/<stem>.rows/<row_id>.<ext>` (what a rerun reuses instead of paying again); once
the rows are done the named file is built from them: the input, with every finished row's
region taken from that row's result, sample for sample. A row that did not finish leaves
its region as the input has it, and the run's notes say which.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from soundpatch import audio as audio_ops
from soundpatch.audio import Audio, Patched, ReadBack
from soundpatch.errors import RowError
from soundpatch.humanize import plural


@dataclass
class CombinedFile:
    """What became of one combined file."""

    name: str
    output: str = ""  # where it was put; "" if it was not
    rows: list[str] = field(default_factory=list)  # rows whose regions it holds
    missing: list[str] = field(default_factory=list)  # rows of it that did not finish: "id (status)"
    error: str = ""  # why it was not put: one or two sentences


def overlay(original: Audio, parts: Iterable[tuple[str, ReadBack, int, int]]) -> Patched:
    """`original` with frames [a, b) of each part taken from that part: (row id, the row's
    result read back with frames [a, b) kept, a, b), regions apart. Outside the parts'
    regions the samples are the original's, bit for bit; inside, the result's own
    (converted only when its sample format differs)."""
    regions = []
    for row_id, part, a, b in parts:
        if (part.frames, part.excerpt.channels) != (original.frames, original.channels):
            raise RowError(
                f"row {row_id}'s result has {part.frames} frames of {part.excerpt.channels} channels where its "
                f"input has {original.frames} of {original.channels}"
            )
        samples = part.excerpt.samples[a - part.lo : b - part.lo]
        if samples.dtype != original.samples.dtype:
            samples = audio_ops.from_float(audio_ops.to_float(samples), original)
        regions.append((a, samples))
    return Patched(original, sorted(regions, key=lambda region: region[0]))


def combined_note(files: list[CombinedFile]) -> list[str]:
    """The run's notes on its combined files: how many, and any left incomplete or unmade."""
    notes = []
    made = [f for f in files if f.output]
    if made:
        shown = ", ".join(f"{f.name} ({plural(len(f.rows), 'row')})" for f in made[:3])
        notes.append(
            f"{len(made)} {'file holds' if len(made) == 1 else 'files hold'} the edits of several rows of one "
            f"recording each: {shown}{', ...' if len(made) > 3 else ''}; each row's own result is beside it "
            "in <name>.rows/."
        )
    for f in files:
        if f.output and f.missing:
            regions = "its region is" if len(f.missing) == 1 else "their regions are"
            notes.append(
                f"{f.name} holds {len(f.rows)} of its {len(f.rows) + len(f.missing)} rows' edits: "
                f"{_listed(f.missing)} did not finish, so {regions} as in the input; mend or run "
                "them again with the same --run-id to complete it."
            )
        elif not f.output:
            notes.append(f"{f.name} was not made. {f.error}")
    return notes


def _listed(rows: list[str]) -> str:
    return ", ".join(rows[:5]) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
