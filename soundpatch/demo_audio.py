"""Synthesized material for the example manifests, the tests and the benchmarks.

Real-ish on purpose: produced, loop-based music (a repeating chord progression on a grid,
as in game and library music) whose repeats are never identical (every note's velocity
varies, and there is a noise floor), and a formant-synthesised voice with jittered pitch
and changing vowels. Deterministic for a given seed, so no
audio has to be downloaded and results are reproducible.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import lfilter

_CHORDS = [(57, 60, 64), (53, 57, 60), (48, 52, 55), (55, 59, 62)]  # Am F C G (MIDI)


def _hz(midi: float) -> float:
    return 440.0 * 2 ** ((midi - 69) / 12)


def _note(freq: float, dur: float, rate: int, decay: float, bright: float, release: float = 0.0) -> np.ndarray:
    n = int(dur * rate)
    t = np.arange(n) / rate
    vib = 1 + 0.003 * np.sin(2 * np.pi * 5.5 * t)
    phase = 2 * np.pi * freq * np.cumsum(vib) / rate
    tone = sum((bright**k) / k * np.sin(k * phase) for k in range(1, 7))
    env = np.minimum(1, t / 0.01) * np.exp(-t * decay)
    if release:  # faded out, where without it the note stops dead: a discontinuity, a click
        env *= np.minimum(1, (dur - t) / release)
    return tone * env


def music(seconds: float, rate: int = 44100, channels: int = 2, seed: int = 0, smooth: bool = False) -> np.ndarray:
    """A loop-based piece at 120 bpm: chords, bass, melody, hats. Float32, (frames, channels).

    Its notes stop dead at their ends, each a small click; `smooth` fades them out over
    5 ms instead, for measuring a click detector's false alarms (bench/clicks.py)."""
    release = 0.005 if smooth else 0.0
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    out = np.zeros((n + rate, channels))
    beat = 0.5
    hat = rng.standard_normal(int(0.03 * rate)) * np.exp(-np.arange(int(0.03 * rate)) / (0.006 * rate))
    melody = [69, 72, 76, 74, 72, 69, 67, 69]
    for i in range(int(seconds / beat) + 1):
        s0 = int(i * beat * rate)
        if s0 >= n:
            break
        chord = _CHORDS[(i // 4) % 4]
        vel = rng.uniform(0.85, 1.0)
        pan = np.linspace(0.3, 0.7, channels) if channels > 1 else np.array([0.5])
        if i % 2 == 0:
            for k, midi in enumerate(chord):
                tone = 0.08 * vel * _note(_hz(midi), 1.0, rate, 2.5, 0.45, release)
                out[s0 : s0 + len(tone)] += tone[:, None] * (pan if k % 2 else pan[::-1])
        bass = 0.18 * vel * _note(_hz(chord[0] - 12), beat, rate, 3.0, 0.3, release)
        out[s0 : s0 + len(bass)] += bass[:, None]
        lead = 0.1 * rng.uniform(0.85, 1.0) * _note(_hz(melody[i % 8]), beat * 0.9, rate, 2.0, 0.6, release)
        out[s0 : s0 + len(lead)] += lead[:, None] * pan[::-1][None, :]
        h = 0.05 * rng.uniform(0.5, 1.0) * hat
        out[s0 : s0 + len(h)] += h[:, None]
    hiss = 10 ** (-60 / 20) * rng.standard_normal((n, channels))
    return (out[:n] * 0.9 + hiss).astype(np.float32)


_VOWELS = {  # formant frequencies (Hz) and bandwidths
    "a": ((730, 1090, 2440), (90, 110, 170)),
    "e": ((530, 1840, 2480), (60, 100, 140)),
    "i": ((270, 2290, 3010), (60, 90, 150)),
    "o": ((570, 840, 2410), (70, 80, 160)),
    "u": ((300, 870, 2240), (60, 80, 140)),
}


def voice(seconds: float, rate: int = 16000, seed: int = 0, smooth: bool = False) -> np.ndarray:
    """Formant-synthesised speech-like voice: syllables of jittered glottal pulses.

    Its syllables rise and fall steeply (a square-root envelope) and meet with a tick;
    `smooth` gives them a sine envelope, which meets the next without one."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    out = np.zeros(n)
    pos = 0
    while pos < n:
        syl = int(rng.uniform(0.12, 0.25) * rate)
        pause = int(rng.uniform(0.02, 0.15) * rate) if rng.random() < 0.3 else 0
        vowel = _VOWELS[rng.choice(list(_VOWELS))]
        f0 = rng.uniform(105, 140)
        t = np.arange(syl) / rate
        pitch = f0 * (1 + 0.08 * np.sin(np.pi * t / t[-1])) * (1 + 0.01 * rng.standard_normal(syl))
        phase = np.cumsum(pitch) / rate
        pulses = np.diff(np.floor(phase), prepend=0.0) * 1.0
        source = lfilter([1.0], [1.0, -0.95], pulses) + 0.02 * rng.standard_normal(syl)
        sig = source
        for f, bw in zip(*vowel, strict=True):
            r = np.exp(-np.pi * bw / rate)
            theta = 2 * np.pi * f / rate
            sig = lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], sig)
        env = np.sin(np.pi * np.arange(syl) / syl) ** (1.0 if smooth else 0.5)
        end = min(n, pos + syl)
        out[pos:end] += (sig * env)[: end - pos]
        pos = end + pause
    return (0.5 * out / (np.max(np.abs(out)) + 1e-9)).astype(np.float32)[:, None]


def effect(seconds: float = 2.5, rate: int = 48000, seed: int = 0) -> np.ndarray:
    """A short mono sound effect: a filtered noise whoosh into a pitched impact ring."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    noise = rng.standard_normal(n)
    sweep = lfilter([0.05], [1, -0.95], noise) * np.exp(-((t - 0.6) ** 2) / 0.08)
    hit_at = int(1.0 * rate)
    ring = np.zeros(n)
    tt = t[: n - hit_at]
    ring[hit_at:] = sum(np.sin(2 * np.pi * f * tt) * np.exp(-tt * d) for f, d in ((180, 3), (423, 5), (911, 8)))
    sig = 0.4 * sweep / (np.abs(sweep).max() + 1e-9) + 0.5 * ring / 3
    return sig.astype(np.float32)[:, None]
