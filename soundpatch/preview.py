"""Small listening copies of each edit, kept in the run folder for the report.

For published results, the region with up to a second of context each side is saved
twice, before and after, mono 16-bit WAV at up to 16 kHz (cheap to write: a row spends a
millisecond on it), with where the region sits in it. The report turns them into players
(Ogg Vorbis), waveforms and spectrograms; `soundpatch report RUN_ID` can redo that without
the sources or outputs. A run keeps KEEP of them, plus one for every flagged result: the
report shows no more.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from soundpatch.audio import Audio, mono, to_float
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


def file_stem(row_id: str) -> str:
    return _UNSAFE.sub("_", row_id)[:150] or "_"


def save(folder: Path, row_id: str, original: Audio, result: Audio, a: int, b: int) -> None:
    rate = original.rate
    context = round(CONTEXT_SECONDS * rate)
    lo = max(0, a - context)
    hi = min(original.frames, min(b, a + round(MAX_REGION_SECONDS * rate)) + context)
    target = min(rate, PREVIEW_RATE)
    stem = file_stem(row_id)
    for label, audio in (("before", original), ("after", result)):
        mono = _mono(audio.samples[lo:hi])
        if target != rate:
            mono = soxr.resample(mono, rate, target).astype(np.float32)
        buf = io.BytesIO()
        sf.write(buf, np.clip(mono, -1, 1), target, format="WAV", subtype="PCM_16")
        atomic_write(folder / f"{stem}.{label}.wav", buf.getvalue())
    meta = {"rate": target, "region": [(a - lo) / rate, (min(b, hi) - lo) / rate], "start": lo / rate}
    atomic_write(folder / f"{stem}.json", json.dumps(meta).encode())


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
    buf = io.BytesIO()
    sf.write(buf, np.clip(p.before if label == "before" else p.after, -1, 1), p.rate, format="OGG", subtype="VORBIS")
    return buf.getvalue()


def _mono(samples: np.ndarray) -> np.ndarray:
    return mono(to_float(samples)).astype(np.float32)
