"""Finding dropouts across an archive, and the restoration manifest that fills them.

Nobody lists the gaps of a thousand recordings by hand. A dropout is digital silence
(every channel under -80 dBFS) at least `min_seconds` long that cuts through sound: the
audio on each side of it is heard (-50 dBFS or more over 20 ms), and it stops and starts
mid-sound (its last and first 2 ms are within 12 dB of those 20 ms). A pause, which sound
fades into and rises out of, is not one; nor is silence at either end of a file.

Conservative on purpose: each region found is a paid prediction on a hosted provider.
Clicks are not looked for: telling a click from a note's attack needs more than a
threshold, and a false one costs money.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from soundpatch.audio import Audio

SILENT = 1e-4  # -80 dBFS
HEARD_DB = -50.0
SIDE_SECONDS = 0.02
EDGE_SECONDS = 0.002
EDGE_DROP_DB = 12.0
CHUNK_FRAMES = 1 << 20  # read as floats a chunk at a time: memory stays small for long files


@dataclass(frozen=True)
class Dropout:
    start: float  # seconds
    end: float
    recording_seconds: float  # how long the recording it is in is


def find_dropouts(audio: Audio, min_seconds: float = 0.005, max_seconds: float = 10.0) -> list[Dropout]:
    """The dropouts of one recording, in time order."""
    rate, frames = audio.rate, audio.frames
    quiet = np.concatenate(
        [
            np.all(np.abs(audio.float_slice(lo, lo + CHUNK_FRAMES)) < SILENT, axis=1)
            for lo in range(0, frames, CHUNK_FRAMES)
        ]
    )
    edges = np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]]))
    side, edge = round(SIDE_SECONDS * rate), max(1, round(EDGE_SECONDS * rate))
    found = []
    for a, b in zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True):
        if a == 0 or b == frames or not min_seconds * rate <= b - a <= max_seconds * rate:
            continue
        before, after = _db(audio.float_slice(a - side, a)), _db(audio.float_slice(b, b + side))
        cut_in = _db(audio.float_slice(a - edge, a)) >= before - EDGE_DROP_DB
        cut_out = _db(audio.float_slice(b, b + edge)) >= after - EDGE_DROP_DB
        if min(before, after) >= HEARD_DB and cut_in and cut_out:
            found.append(Dropout(a / rate, b / rate, frames / rate))
    return found


def _db(x: np.ndarray) -> float:
    power = float(np.mean(np.square(x, dtype=np.float64))) if x.size else 0.0
    return 10 * math.log10(power) if power > 0 else -math.inf


def restoration_manifest(found: Iterable[tuple[str, Dropout]], folder: str, prompt: str, margin_seconds: float) -> str:
    """CSV rows filling `found` ((input, dropout) pairs, in time order per input).

    Each region is widened by `margin_seconds` on each side, so that the splice's
    crossfades blend real audio, not the silence; dropouts whose widened regions meet are
    one row. Local inputs are written relative to `folder`, where the manifest goes (a
    manifest's paths are read relative to it). Each recording's repairs go into one file,
    under the run's folder at the recording's place in the archive: `take.wav` of two
    albums stays two files."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["id", "input", "start", "end", "prompt", "note", "output"])
    by_source: dict[str, list[Dropout]] = {}
    for source, d in found:
        by_source.setdefault(source, []).append(d)
    places = _places(list(by_source))
    taken: set[str] = set()
    for source, dropouts in by_source.items():
        for group in _meeting(dropouts, margin_seconds):
            first, last = group[0], group[-1]
            start = max(0.0, math.floor(round((first.start - margin_seconds) * 10_000, 3)) / 10_000)
            end = min(last.recording_seconds, math.ceil(round((last.end + margin_seconds) * 10_000, 3)) / 10_000)
            row_id = base = f"{PurePosixPath(source).stem}-dropout-{first.start:.3f}s"
            n = 1
            while row_id in taken:
                n += 1
                row_id = f"{base}-{n}"
            taken.add(row_id)
            shown = source if "://" in source else os.path.relpath(source, folder)
            ms = 1000 * sum(d.end - d.start for d in group)
            note = f"dropout of {ms:.0f} ms" if len(group) == 1 else f"{len(group)} dropouts, {ms:.0f} ms in all,"
            writer.writerow(
                [row_id, shown, f"{start:.4f}", f"{end:.4f}", prompt, f"{note} at {first.start:.3f} s", places[source]]
            )
    return text.getvalue()


def _meeting(dropouts: list[Dropout], margin: float) -> list[list[Dropout]]:
    groups: list[list[Dropout]] = []
    for d in sorted(dropouts, key=lambda d: d.start):
        if groups and d.start - margin <= groups[-1][-1].end + margin:
            groups[-1].append(d)
        else:
            groups.append([d])
    return groups


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
