"""Finding clicks: short bursts that stand out from the audio around them.

Vinyl ticks and crackle, a bad splice, a digital glitch. Music and speech are well
predicted a few milliseconds ahead by an autoregressive model of their recent past; a
click is not. Each block of about 46 ms gets its own AR model (its autocorrelation,
solved by Levinson's recursion for every block at once), and the model's prediction
error is measured against that block's typical error (a median, which a click does not
move). Godsill & Rayner, "Digital Audio Restoration" (1998), ch. 5, detect clicks so.

An error over THRESHOLD times the typical one is a candidate. It is a click when:
- it is short: at most `max_seconds` (6 ms by default), plus the model's order, over
  which a click's error trails on. A hi-hat's noise is unpredictable for longer (at 8 ms,
  dense drums gave 14 times the false alarms);
- it stands out: its error is STANDOUT times any other error within 12 ms of it. A voice's
  glottal pulses are a series of such bursts, and fail this. So do two clicks within 12 ms
  of each other, each hiding the other; where a recording crackles (CRACKLE_CLICKS
  clicks that stand out within CRACKLE_SECONDS), such a burst is a click too, unless it is
  one of an evenly spaced series (pulses: two other bursts near it a whole number of
  periods of 2-15 ms away) or does not stand out from the error between the bursts.
  (Setting aside clicks found already instead made glottal pulses next to a click stand
  out in turn: bench/clicks.py, 5 false alarms on a minute of speech, none without.)
  Crackle over music is found so (bench/clicks.py: 84% of 20 ticks a second, where 66%
  stood out alone); over a voice, the ticks that fall in step with its pulses are not;
- the sound goes on past it at about the level it had before it (within STEP_DB, over
  20 ms each side): a drum hit or the end of a sound changes the level; a click leaves it
  as it was. Speech changes its level fast: at 6 dB, 25 of 40 clicks on it were found; at 10, 32;
- nothing louder starts with it: the loudest sample of the 5 ms after it is no more than
  ONSET_DB over that of the 5 ms before it. A rimshot or a pluck is predictable once it
  has begun (a ringing tone), so its error is one short burst, as a click's; what it
  leaves ringing after it is not there before it. A pop (a smooth bump) is predictable
  once begun too, so the bump itself comes after its burst of error, louder: it passes
  when the 5 ms after the longest click would be over are back to within SETTLED_DB of
  before. Pops smoother or wider than about a millisecond are missed in busy music (their
  start hardly breaks the prediction), in bench/clicks.py as in any such detector.

What it cannot tell from a click is a sound like one over louder audio: a rimshot in a
busy mix, a clave, a tick of a clock (dense drums: about 3 false alarms a minute); and a
note stopped dead, or a bad splice, is a discontinuity, which it finds (and which is worth
mending).

Conservative on purpose, as `dropouts.py`: each click found is rebuilt (by the local
engine, even where a hosted provider fills the longer dropouts; with `detect
--all-to-provider`, each row of them is a paid prediction). Measured in bench/clicks.py
(clicks found, and false alarms on clean music, speech, drums and a sound effect).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from soundpatch.audio import Audio
from soundpatch.engine.autoregressive import WHITE_NOISE_CORRECTION
from soundpatch.restoration import Damage

THRESHOLD = 8.0  # a candidate's prediction error, in multiples of its block's typical one
STANDOUT = 2.5  # ... and in multiples of any other within NEIGHBOURHOOD_SECONDS
STEP_DB = 10.0  # the most the level may change across a click
QUIET_DB = -60.0  # levels under this count as this: a click in silence is a click
ERROR_FLOOR = 10 ** (-70 / 20)  # prediction errors under -70 dBFS are never a click
NEIGHBOURHOOD_SECONDS = 0.012
LEVEL_SECONDS = 0.02  # the level before and after a click, over this long
GUARD_SECONDS = 0.001  # ... from this far from it
ONSET_SECONDS = 0.005  # the loudest of this long just after it, against just before it
ONSET_DB = 9.0
SETTLED_DB = 1.5  # ... unless, once the longest click would be over, it is back to within this
BLOCK_SECONDS = 0.046
# Crackle: where clicks that stand out come CRACKLE_CLICKS or more within CRACKLE_SECONDS
# of a burst, the recording crackles there, and a burst hidden by a neighbour (each of two
# clicks close together hides the other) is a click too, unless it is one of a series
# (a voice's glottal pulses, a bowed string's: evenly spaced, within SERIES_TOLERANCE of
# their period, 2 to 15 ms) or does not stand out from the audio between the bursts.
CRACKLE_CLICKS = 4
CRACKLE_SECONDS = 0.25
LESSER = THRESHOLD / 2  # bursts over this many times the typical error count towards a series, and are not "between"
SERIES_SECONDS = (0.002, 0.015)
SERIES_TOLERANCE = 0.05  # of the period (at least 2 samples)
SERIES_MULTIPLES = 2
SERIES_WINDOW_SECONDS = 0.036  # where a burst's series is looked for, each side
CHUNK_FRAMES = 1 << 20  # read as floats a chunk at a time: memory stays small for long files


def order_for(rate: int) -> int:
    """The AR model's order: about one coefficient a kHz of sample rate (44 at 44.1 kHz)."""
    return int(np.clip(round(rate / 1000), 12, 48))


@dataclass(frozen=True)
class _Frames:
    """The detector's lengths, in frames at one sample rate."""

    order: int  # the AR model's
    block: int
    near: int  # the neighbourhood a click stands out from
    guard: int
    level: int
    onset: int
    longest: int  # a click's burst of error, trail included
    crackle: int
    series: tuple[int, int]  # the periods a series may have
    series_window: int

    @classmethod
    def at(cls, rate: int, max_seconds: float) -> _Frames:
        order = order_for(rate)
        return cls(
            order=order,
            block=1 << round(math.log2(BLOCK_SECONDS * rate)),
            near=round(NEIGHBOURHOOD_SECONDS * rate),
            guard=max(1, round(GUARD_SECONDS * rate)),
            level=round(LEVEL_SECONDS * rate),
            onset=round(ONSET_SECONDS * rate),
            longest=round(max_seconds * rate) + order,
            crackle=round(CRACKLE_SECONDS * rate),
            series=(round(SERIES_SECONDS[0] * rate), round(SERIES_SECONDS[1] * rate)),
            series_window=round(SERIES_WINDOW_SECONDS * rate),
        )


def find_clicks(audio: Audio, max_seconds: float = 0.006) -> list[Damage]:
    """The clicks of one recording, in time order."""
    rate, frames = audio.rate, audio.frames
    n = _Frames.at(rate, max_seconds)
    margin = n.block + max(n.near, n.level, n.crackle) + n.longest  # what a chunk reads past its own frames
    found: list[Damage] = []
    for lo in range(0, frames, CHUNK_FRAMES):
        hi = min(frames, lo + CHUNK_FRAMES)
        start = max(0, lo - margin)
        x = np.asarray(audio.float_slice(start, min(frames, hi + margin)), np.float64)
        errors = [_prediction_error(x[:, c], n.order, n.block) for c in range(x.shape[1])]
        error = np.max([e for e, _ in errors], axis=0)
        score = np.max([e / typical for e, typical in errors], axis=0)
        score[error < ERROR_FLOOR] = 0.0
        power = np.mean(np.square(x), axis=1)
        for a, b in _clicks(score, error, power, lo - start, hi - start, n):
            found.append(Damage((start + a) / rate, (start + b) / rate, frames / rate, "click"))
    return found


def _clicks(
    score: np.ndarray, error: np.ndarray, power: np.ndarray, lo: int, hi: int, n: _Frames
) -> list[tuple[int, int]]:
    """The [a, b) spans of `score` that are clicks, for those starting in [lo, hi). A burst
    is errors over THRESHOLD no more than the model's order apart; it stands out by its
    `error` itself, which does not jump where one block's typical error gives way to the next's.
    A burst hidden by a neighbour is a click where the recording crackles (CRACKLE_CLICKS)."""
    clear, hidden = [], []
    for a, b in ((int(g[0]), int(g[-1]) + 1) for g in _bursts(score, THRESHOLD, n)):
        if b - a <= n.longest and _like_a_click(power, a, b, n):
            (clear if _stands_out(error, a, b, n) else hidden).append((a, b))
    starts = np.array([a for a, _ in clear], dtype=np.int64)
    crackle = [
        (a, b)
        for a, b in hidden
        if _crackling(starts, a, n) and not _in_series(score, error, a, b, n) and _over_the_rest(score, error, a, b, n)
    ]
    return sorted(c for c in clear + crackle if lo <= c[0] < hi)


def _like_a_click(power: np.ndarray, a: int, b: int, n: _Frames) -> bool:
    """Whether the sound goes on past [a, b) at the level it had, and nothing louder starts with it."""
    before, after = power[max(0, a - n.level) : max(0, a - n.guard)], power[b + n.guard : b + n.level]
    if len(before) < n.guard or len(after) < n.guard:
        return False  # at either end of the recording: nothing to compare with
    if abs(_db(after) - _db(before)) > STEP_DB:
        return False
    louder_after = _peak_db(power[b : b + n.onset]) - (quiet := _peak_db(power[max(0, a - n.onset) : a]))
    settled = _peak_db(power[a + n.longest : a + n.longest + n.onset]) - quiet <= SETTLED_DB
    return not (louder_after > ONSET_DB and not settled)


def _stands_out(error: np.ndarray, a: int, b: int, n: _Frames) -> bool:
    """Whether the burst [a, b) is STANDOUT times any other error within the neighbourhood."""
    w0, w1 = max(0, a - n.near), min(len(error), b + n.near)
    around = error[w0:w1].copy()
    around[max(0, a - n.guard - w0) : b + n.guard - w0] = 0.0
    return bool(error[a:b].max() >= STANDOUT * around.max(initial=0.0))


def _crackling(clear_starts: np.ndarray, a: int, n: _Frames) -> bool:
    """Whether clicks that stand out come CRACKLE_CLICKS or more within CRACKLE_SECONDS of `a`."""
    first, last = np.searchsorted(clear_starts, [a - n.crackle, a + n.crackle])
    return bool(last - first >= CRACKLE_CLICKS)


def _in_series(score: np.ndarray, error: np.ndarray, a: int, b: int, n: _Frames) -> bool:
    """Whether the burst [a, b) is one of an evenly spaced series of bursts (glottal
    pulses): two others near it each a whole number of periods (1 to SERIES_MULTIPLES)
    from it. Not every pulse of a series is its own burst: one a click beside it is
    merged into, or one under LESSER, is not."""
    w0, w1 = max(0, a - n.series_window), min(len(score), b + n.series_window)
    own = a + int(np.argmax(error[a:b]))
    away = [abs(w0 + int(g[np.argmax(error[w0 + g])]) - own) for g in _bursts(score[w0:w1], LESSER, n)]
    away = [d for d in away if d > n.order]
    for i, d in enumerate(away):
        for k in range(1, SERIES_MULTIPLES + 1):
            period = d / k
            if not n.series[0] <= period <= n.series[1]:
                continue
            slack = max(2.0, SERIES_TOLERANCE * period)
            for e in away[:i] + away[i + 1 :]:
                m = round(e / period)
                if 1 <= m <= SERIES_MULTIPLES and abs(e - m * period) <= slack * m:
                    return True
    return False


def _over_the_rest(score: np.ndarray, error: np.ndarray, a: int, b: int, n: _Frames) -> bool:
    """Whether the burst [a, b) is STANDOUT times the error between the bursts near it (in
    crackle, the music between the ticks; in a noisy sound, its noise)."""
    w0, w1 = max(0, a - n.near), min(len(error), b + n.near)
    reach = np.ones(2 * n.order + 1)  # a burst's samples and the model's order either side
    in_bursts = np.convolve(score[w0:w1] > LESSER, reach, mode="same") > 0
    between = np.where(in_bursts, 0.0, error[w0:w1])
    return bool(error[a:b].max() >= STANDOUT * between.max(initial=0.0))


def _bursts(score: np.ndarray, threshold: float, n: _Frames) -> list[np.ndarray]:
    """The indices of `score` over `threshold`, in runs no more than the model's order apart."""
    over = np.flatnonzero(score > threshold)
    return np.split(over, np.flatnonzero(np.diff(over) > n.order) + 1) if len(over) else []


def _peak_db(power: np.ndarray) -> float:
    peak = float(power.max(initial=0.0))
    return max(QUIET_DB, 10 * math.log10(peak) if peak > 0 else QUIET_DB)


def _db(power: np.ndarray) -> float:
    mean = float(np.mean(power))
    return max(QUIET_DB, 10 * math.log10(mean) if mean > 0 else QUIET_DB)


def _prediction_error(x: np.ndarray, p: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's AR prediction error (its size), and its block's typical one.

    Blocks of `block` samples, each modelled from the 2 * block samples centred on it
    (Hann-windowed); the models of all blocks are found at once."""
    import scipy.fft  # 0.16 s to import: only when clicks are looked for, not for every command

    n = len(x)
    count = -(-n // block)
    half = block // 2
    padded = np.zeros(count * block + 2 * block)
    padded[half : half + n] = x
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * block)[::block][:count] * np.hanning(2 * block)
    size = scipy.fft.next_fast_len(2 * block + p, real=True)  # lags up to p without wrapping round
    spectrum = scipy.fft.rfft(windows, size, axis=1)
    r = scipy.fft.irfft(spectrum * np.conj(spectrum), size, axis=1)[:, : p + 1]
    r[:, 0] *= 1.0 + WHITE_NOISE_CORRECTION  # as the engine's: near-silent or tonal blocks stay well conditioned
    a = _levinson(r)
    history = np.zeros(count * block + p)
    history[p : p + n] = x
    error = np.empty((count, block))
    for i in range(count):  # a short filter on each block: far fewer passes than p + 1 over them all
        error[i] = np.convolve(history[i * block : (i + 1) * block + p], a[i], mode="valid")
    error = np.abs(error)
    typical = np.maximum(1.4826 * np.median(error, axis=1, keepdims=True), 1e-9)
    return error.reshape(-1)[:n], np.broadcast_to(typical, error.shape).reshape(-1)[:n]


def _levinson(r: np.ndarray) -> np.ndarray:
    """AR polynomials [1, a1..ap] for rows of autocorrelations r (blocks, p + 1), all at once.

    Silent blocks get [1, 0...0]: their error is the signal itself."""
    count, q = r.shape
    a = np.zeros((count, q))
    a[:, 0] = 1.0
    energy = r[:, 0].copy()
    live = energy > 1e-20
    for k in range(1, q):
        acc = r[:, k] + np.einsum("ij,ij->i", a[:, 1:k], r[:, k - 1 : 0 : -1])
        reflection = np.where(live, -acc / np.where(live, energy, 1.0), 0.0)
        a[:, 1:k] = a[:, 1:k] + reflection[:, None] * a[:, k - 1 : 0 : -1]
        a[:, k] = reflection
        energy *= 1.0 - reflection**2
        live &= energy > 1e-20 * r[:, 0]
    return a
