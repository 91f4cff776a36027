"""Small listening copies of each edit, kept in the run folder for the report.

For published results, the region with up to a second of context each side is saved
twice, before and after, mono 16-bit WAV at up to 16 kHz, with where the region sits in
it; and with them what the report's card shows: the picture (soundpatch/picture.py) and
two players (Ogg Vorbis). Made when the row finishes (~50 ms, while other rows wait on
the provider) rather than all at the end of the run; `soundpatch report RUN_ID` redoes
what is missing from the WAVs, without the sources or outputs. The report shows KEEP
cards, flagged results first, so a run makes no more than it can show (see Quota).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from soundpatch import soundio
from soundpatch.audio import Audio, mono, to_float
from soundpatch.cpu import crunching
from soundpatch.picture import draw
from soundpatch.storage import atomic_write

KEEP = 100
CONTEXT_SECONDS = 1.0
MAX_REGION_SECONDS = 8.0  # longer regions are shown from their start
PREVIEW_RATE = 16000
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Preview:
    before: np.ndarray  # mono float32
    after: np.ndarray
    rate: int
    region: tuple[float, float]  # seconds within the excerpt
    start: float  # where the excerpt begins in the file, seconds


class Quota:
    """Which finished results get listening copies, decided as they finish.

    The report shows `keep` cards, flagged results first: so the first `keep` flagged
    results get one, and the others while fewer than `keep` are kept in all. At most
    2 x `keep` in a run however long, where keeping one per flagged result made one for
    every row of a batch that all came back flagged (~60 ms each, never shown).
    """

    def __init__(self, keep: int = KEEP) -> None:
        self.keep, self.flagged, self.kept = keep, 0, 0
        self._lock = threading.Lock()

    def take(self, flagged: bool) -> bool:
        with self._lock:
            if flagged and self.flagged < self.keep:
                self.flagged += 1
            elif flagged or self.kept >= self.keep:
                return False
            self.kept += 1
            return True


def file_stem(row_id: str) -> str:
    return _UNSAFE.sub("_", row_id)[:150] or "_"


def save(folder: Path, row_id: str, original: Audio, result: Audio, a: int, b: int, result_lo: int = 0) -> None:
    """`result`: the published result's frames from `result_lo` on (at least up to a second
    past the region, as audio.read_back keeps them), or all of it."""
    rate = original.rate
    context = round(CONTEXT_SECONDS * rate)
    lo = max(0, a - context)
    hi = min(original.frames, min(b, a + round(MAX_REGION_SECONDS * rate)) + context)
    target = min(rate, PREVIEW_RATE)
    stem = file_stem(row_id)
    files: dict[str, bytes] = {}
    with crunching():  # the drawing and encoding; the files are written after
        sides = {}
        for label, audio, at in (("before", original, 0), ("after", result, result_lo)):
            mono = _mono(audio.samples[lo - at : hi - at])
            if target != rate:
                mono = soxr.resample(mono, rate, target).astype(np.float32)
            sides[label] = np.clip(mono, -1, 1)
            files[f"{label}.wav"] = soundio.write(sides[label], target, "WAV", "PCM_16")
        region = ((a - lo) / rate, (min(b, hi) - lo) / rate)
        files["json"] = json.dumps({"rate": target, "region": list(region), "start": lo / rate}).encode()
        p = Preview(sides["before"], sides["after"], target, region, lo / rate)
        files["png"] = draw(p)
        for label in ("before", "after"):
            files[f"{label}.ogg"] = ogg_bytes(p, label)
    for suffix, data in files.items():
        atomic_write(folder / f"{stem}.{suffix}", data)


@dataclass(frozen=True)
class Media:
    """A report card's picture and players."""

    picture: bytes  # PNG
    before: bytes  # Ogg Vorbis
    after: bytes
    caption: str


def media(folder: Path, row_id: str) -> Media | None:
    """The card's media as saved when the row finished, or made now from its preview."""
    p = load(folder, row_id)
    if p is None:
        return None
    stem = file_stem(row_id)
    try:
        picture = (folder / f"{stem}.png").read_bytes()
        before = (folder / f"{stem}.before.ogg").read_bytes()
        after = (folder / f"{stem}.after.ogg").read_bytes()
    except OSError:
        picture, before, after = draw(p), ogg_bytes(p, "before"), ogg_bytes(p, "after")
    caption = f"{p.start:.2f} s to {p.start + len(p.before) / p.rate:.2f} s; the region is shaded"
    return Media(picture, before, after, caption)


def load(folder: Path, row_id: str) -> Preview | None:
    stem = file_stem(row_id)
    try:
        meta = json.loads((folder / f"{stem}.json").read_text(encoding="utf-8"))
        before, rate = sf.read(folder / f"{stem}.before.wav", dtype="float32")
        after, _ = sf.read(folder / f"{stem}.after.wav", dtype="float32")
    except (OSError, ValueError, sf.LibsndfileError):
        return None
    return Preview(before, after, rate, (meta["region"][0], meta["region"][1]), meta["start"])


def ogg_bytes(p: Preview, label: str) -> bytes:
    """One side of a preview as Ogg Vorbis, small enough to embed in a page."""
    return soundio.write(np.clip(p.before if label == "before" else p.after, -1, 1), p.rate, "OGG", "VORBIS")


def _mono(samples: np.ndarray) -> np.ndarray:
    return mono(to_float(samples)).astype(np.float32)
