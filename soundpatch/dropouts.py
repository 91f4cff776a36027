"""Finding dropouts across an archive (the manifest filling them: restoration.py).

Nobody lists the gaps of a thousand recordings by hand. A dropout is digital silence
(every channel under -80 dBFS) at least `min_seconds` long that cuts through sound: the
audio on each side of it is heard (-50 dBFS or more over 20 ms), and it stops and starts
mid-sound (its last and first 2 ms are within 12 dB of those 20 ms). A pause, which sound
fades into and rises out of, is not one; nor is silence at either end of a file.

Conservative on purpose: on a hosted provider, each dropout found of over 20 ms is a paid
prediction (shorter ones the local engine rebuilds, for nothing: restoration.py).
Clicks are looked for apart, and only when asked (clicks.py).
"""

from __future__ import annotations

import math

import numpy as np

from soundpatch.audio import Audio
from soundpatch.restoration import Damage

SILENT = 1e-4  # -80 dBFS
HEARD_DB = -50.0
SIDE_SECONDS = 0.02
EDGE_SECONDS = 0.002
EDGE_DROP_DB = 12.0
CHUNK_FRAMES = 1 << 20  # read as floats a chunk at a time: memory stays small for long files


def find_dropouts(audio: Audio, min_seconds: float = 0.005, max_seconds: float = 10.0) -> list[Damage]:
    """The dropouts of one recording, in time order."""
    rate, frames = audio.rate, audio.frames
    quiet = np.zeros(frames + 2, np.int8)  # a byte a frame, 0 at both ends
    for lo in range(0, frames, CHUNK_FRAMES):
        chunk = audio.float_slice(lo, lo + CHUNK_FRAMES)
        quiet[1 + lo : 1 + lo + len(chunk)] = np.all(np.abs(chunk) < SILENT, axis=1)
    edges = np.diff(quiet)  # in bytes too: a list's 0s around it made this 8 bytes a frame, twice
    side, edge = round(SIDE_SECONDS * rate), max(1, round(EDGE_SECONDS * rate))
    found = []
    for a, b in zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True):
        if a == 0 or b == frames or not min_seconds * rate <= b - a <= max_seconds * rate:
            continue
        before, after = _db(audio.float_slice(a - side, a)), _db(audio.float_slice(b, b + side))
        cut_in = _db(audio.float_slice(a - edge, a)) >= before - EDGE_DROP_DB
        cut_out = _db(audio.float_slice(b, b + edge)) >= after - EDGE_DROP_DB
        if min(before, after) >= HEARD_DB and cut_in and cut_out:
            found.append(Damage(a / rate, b / rate, frames / rate, "dropout"))
    return found


def _db(x: np.ndarray) -> float:
    power = float(np.mean(np.square(x, dtype=np.float64))) if x.size else 0.0
    return 10 * math.log10(power) if power > 0 else -math.inf
