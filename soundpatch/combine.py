"""One file for the rows of one recording that name it: each row's region, from its result.

Restoration batches list a recording's defects one row each (a click, a dropout, a gap)
and want the recording back once, restored, not one copy per defect. Rows of one input
whose regions do not overlap may therefore name one output (`output: restored/{stem}`,
no `{row_id}`). Each row's own result is still made and kept, at
`restored/<stem>.rows/<row_id>.<ext>` (what a rerun reuses instead of paying again), as an
excerpt of the recording: the row's region and a second each side (`Publisher.part_span`),
not forty copies of a tape for its forty dropouts. Once the rows are done the named file is
built from them: the input, with every finished row's region taken from that row's result,
sample for sample. A row that did not finish leaves its region as the input has it, and
the run's notes say which. Whole results (earlier runs', reused) are taken as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from soundpatch import audio as audio_ops
from soundpatch.audio import Audio, Patched, ReadBack
from soundpatch.cpu import crunching
from soundpatch.edits import Edit
from soundpatch.errors import OutOfRoom, RowError, SoundpatchError, sentence_of
from soundpatch.humanize import plural
from soundpatch.interrupt import stop_requested
from soundpatch.journal import Journal
from soundpatch.outcome import SKIPPED_DONE, SUCCEEDED, Outcome
from soundpatch.publish import Publisher
from soundpatch.sources import SourceReader
from soundpatch.storage import OutputStore


@dataclass
class CombinedFile:
    """What became of one combined file."""

    name: str
    output: str = ""  # where it was put; "" if it was not
    rows: list[str] = field(default_factory=list)  # rows whose regions it holds
    missing: list[str] = field(default_factory=list)  # rows of it that did not finish: "id (status)"
    error: str = ""  # why it was not put: one or two sentences


class Combiner:
    """Builds a run's combined files from its rows' results, once the rows are done."""

    def __init__(
        self, publisher: Publisher, store: OutputStore, sources: SourceReader, journal: Journal, run_dir: Path
    ) -> None:
        self.publisher = publisher
        self.store = store
        self.sources = sources
        self.journal = journal
        self.run_dir = run_dir  # runs/<run_id>/

    def build(
        self,
        outcomes: list[Outcome],
        edits: dict[str, Edit],
        source_of: Callable[[Edit], str],
        log_fault: Callable[[Edit], None],
    ) -> Iterator[CombinedFile]:
        """Each combined file, made or not, in name order whichever row ended first; sets
        `combined` on the rows it holds. `edits` by row id; `source_of(edit)`: its input;
        `log_fault(edit)`: keep the traceback of a bug met making a file of that row's."""
        groups: dict[str, list[Outcome]] = {}
        for o in outcomes:
            name = self.publisher.combined.get(o.row_id)
            if name is not None:
                groups.setdefault(name, []).append(o)
        if groups:
            self.journal.write("combining", files=len(groups))  # for the progress line
        for name, rows in sorted(groups.items()):
            made = CombinedFile(name)
            rows.sort(key=lambda o: o.start or 0.0)
            done = [o for o in rows if o.status in (SUCCEEDED, SKIPPED_DONE) and o.output]
            made.missing = [f"{o.row_id} ({o.status.replace('_', ' ')})" for o in rows if o not in done]
            if stop_requested():
                made.error = "The run was stopped first; run again with the same --run-id to make it."
            elif not done:
                made.error = "None of its rows finished."
            else:
                edit = edits[done[0].row_id]
                try:
                    made.output = self._make(name, edits, source_of(edit), done)
                    made.rows = [o.row_id for o in done]
                except OutOfRoom as exc:  # the rows are done and kept: the rerun builds it from them, at no cost
                    made.error = f"{sentence_of(exc).rstrip('.')} with the same --run-id to make it."
                except (SoundpatchError, OSError) as exc:
                    made.error = sentence_of(exc)
                except Exception as exc:  # a bug: the rows are paid for; their report still gets written
                    made.error = f"Unexpected {type(exc).__name__} (details in {self.run_dir / 'errors.log'})."
                    log_fault(edit)
            for o in done if made.output else ():
                o.combined = made.output
            self.journal.write("combined", name=name, output=made.output, rows=made.rows, missing=made.missing)
            yield made

    def _make(self, name: str, edits: dict[str, Edit], source: str, done: list[Outcome]) -> str:
        edit = edits[done[0].row_id]
        info = self.sources.info(source)
        original = self.sources.audio(source)
        parts = []  # each row's region only: a long recording's rows do not each hold all of it
        for o in done:
            a, b = audio_ops.region_frames(o.start or 0.0, o.end or 0.0, original.rate, original.frames)
            span = self.publisher.part_span(edits[o.row_id], info)
            with self.store.opened(o.output) as result:
                parts.append((o.row_id, region_of(result, o.output, original, a, b, span), a, b))
        with crunching():
            encoded = self.publisher.encode(edit, overlay(original, parts), info, name=name)
        metadata = {
            "run_id": self.run_dir.name,
            "input": edit.input,
            "rows": ",".join(o.row_id for o in done),
            "regions": ",".join(f"{o.start:g}-{o.end:g}" for o in done),
            "source_sha256": self.sources.checksum(source),
        }
        try:
            return self.store.put(encoded.name, encoded.path, encoded.content_type, metadata)
        finally:
            encoded.discard()


def excerpt_frames(lo: int, hi: int, frames: int) -> str:
    """What a row's own result holds of its recording, when only frames [lo, hi) of the
    `frames` it has (a row of a combined file: `Publisher.part_span`), as its index record
    and metadata say it: "lo-hi/frames"."""
    return f"{lo}-{hi}/{frames}"


def excerpt_span(text: str | None) -> tuple[int, int] | None:
    """`excerpt_frames`'s (lo, hi) back; None for a result that is the whole recording."""
    if not text:
        return None
    span, _, _ = str(text).partition("/")
    lo, _, hi = span.partition("-")
    return int(lo), int(hi)


def region_of(path: Path, name: str, original: Audio, a: int, b: int, span: tuple[int, int] | None) -> ReadBack:
    """Frames [a, b) of `original` as a row's result at `path` has them, positioned in the
    recording: the result is the whole recording (as every row's was before results of
    combined rows were excerpts, and as an earlier whole one reused still is), or an excerpt
    holding frames `span` of it. A result that is neither is read as a whole one, for
    `overlay` to refuse with its length named."""
    frames = audio_ops.stored(path, name).frames
    excerpt = span is not None and frames != original.frames and frames == span[1] - span[0]
    at = span[0] if span is not None and excerpt else 0
    back = audio_ops.read_back(path, a - at, b - at, name)
    return ReadBack(original.frames if excerpt else back.frames, back.excerpt, a)


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
            f"recording each: {shown}{', ...' if len(made) > 3 else ''}; each row's own result (its region and "
            "a second each side) is beside it in <name>.rows/."
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
