"""How many clicks `soundpatch detect --clicks` finds, and how many it finds where there are none.

    python bench/clicks.py [--seconds 60] [--clicks 60] [--crackle 20 80]

Clean material (music, speech at two rates, dense drums, a sound effect) has clicks
punched into it: 0.05-5 ms of windowed noise (and apart, pops: smooth bumps of 0.2-1 ms,
+10 to +20 dB), at random times, in three bands of level
over the audio around them (in a pause, over a level 20 dB under the material's). For
each material and band: clicks found (a span found overlaps it, give or take 3 ms), false alarms (found where none was
put), and, on the clean material alone, false alarms a minute. The same table for a
baseline measured in the same run: a threshold on the first difference (|x[n] - x[n-1]|
over 8 times its median in the surrounding 46 ms), the simplest click detector there is.
Then crackle: ticks of 0.05-1 ms, 0 to +20 dB over the audio around them, at random
(Poisson) all through each material, `--crackle` a second: ticks found (false alarms), and
the rows `detect` would write for them (found ticks whose regions, widened by the splice's
10 ms crossfade, meet are one row) with the longest of them. Last column of the first
table: seconds of CPU a minute of audio.

Last, those rows restored by the local engine, over the first `--restore-seconds` of each
material: the SNR over the rows' regions against the clean material, left as it is, with
each region rebuilt whole (the engine before rows named their `damaged` spans), and with
the damaged spans alone rebuilt (the clicks' spans as detect writes them), and the CPU
seconds each took.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from soundpatch import demo_audio
from soundpatch.audio import Audio, damaged_frames
from soundpatch.clicks import find_clicks
from soundpatch.providers.base import InpaintRequest
from soundpatch.providers.local import LocalEngine
from soundpatch.restoration import CLICK_PAD_SECONDS, Damage, _meeting

BANDS = ((-10, 0), (0, 10), (10, 20))  # dB over the audio around the click
POPS = (10, 20)


def drums(seconds: float, rate: int, seed: int) -> np.ndarray:
    """Kick, snare, hats and rimshots on sixteenths at 120 bpm: sudden hits everywhere."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    out = np.zeros(n)
    t = np.arange(int(0.5 * rate)) / rate
    kick = np.sin(2 * np.pi * (50 * t + 100 * (1 - np.exp(-t * 30)) / 30)) * np.exp(-t * 8)
    snare = (0.6 * rng.standard_normal(len(t)) + 0.4 * np.sin(2 * np.pi * 200 * t)) * np.exp(-t * 15)
    hat = rng.standard_normal(len(t)) * np.exp(-t / 0.006)
    rim = np.sin(2 * np.pi * 1800 * t) * np.exp(-t / 0.004)
    for i in range(int(seconds / 0.125)):
        s = int(i * 0.125 * rate)
        hits = ((kick, 0.5 if i % 4 == 0 else 0.1, 0.5), (snare, 0.5 if i % 8 == 4 else 0.05, 0.3))
        for sound, chance, gain in (*hits, (hat, 0.7, 0.1), (rim, 0.1, 0.2)):
            if rng.random() < chance:
                m = min(len(sound), n - s)
                out[s : s + m] += gain * rng.uniform(0.6, 1) * sound[:m]
    out += 10 ** (-60 / 20) * rng.standard_normal(n)
    return np.stack([out, 0.9 * out], axis=1)


def punch(
    x: np.ndarray, rate: int, count: int, band: tuple[int, int], rng, smooth: bool = False
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """`x` with `count` clicks: crackle (windowed noise, 0.05-5 ms), or with `smooth`, pops
    (a raised-cosine bump, 0.2-1 ms, which a model predicts once it has begun)."""
    y, spans = x.copy(), []
    at = np.sort(rng.choice(np.arange(rate // 2, len(x) - rate // 2), count, replace=False))
    quietest = 0.1 * np.sqrt(np.mean(np.square(x)))  # in a pause, 20 dB under the material's level
    for a in at:
        w = max(1, int(rng.uniform(*((0.2, 1.0) if smooth else (0.05, 5.0))) / 1000 * rate))
        level = max(quietest, np.sqrt(np.mean(np.square(x[max(0, a - rate // 50) : a + rate // 50]))))
        shape = (np.ones(w) if smooth else rng.standard_normal(w)) * np.hanning(w + 2)[1:-1] if w > 2 else np.ones(w)
        shape *= level * 10 ** (rng.uniform(*band) / 20) * rng.choice([-1, 1]) / np.abs(shape).max()
        y[a : a + w] += shape[:, None] * rng.uniform(0.5, 1.0, x.shape[1])[None, :]
        spans.append((a / rate, (a + w) / rate))
    return np.clip(y, -1, 1), spans


def crackle(x: np.ndarray, rate: int, per_second: float, rng) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """`x` with crackle all through it: `per_second` ticks of 0.05-1 ms of windowed noise
    on average, at random times, 0 to +20 dB over the audio around each."""
    y, spans = x.copy(), []
    count = rng.poisson(per_second * (len(x) / rate - 1))
    quietest = 0.1 * np.sqrt(np.mean(np.square(x)))
    for a in np.sort(rng.integers(rate // 2, len(x) - rate // 2, count)):
        w = max(1, int(rng.uniform(0.05, 1.0) / 1000 * rate))
        level = max(quietest, np.sqrt(np.mean(np.square(x[max(0, a - rate // 50) : a + rate // 50]))))
        shape = rng.standard_normal(w) * np.hanning(w + 2)[1:-1] if w > 2 else np.ones(w)
        shape *= level * 10 ** (rng.uniform(0, 20) / 20) * rng.choice([-1, 1]) / np.abs(shape).max()
        y[a : a + w] += shape[:, None]
        spans.append((a / rate, (a + w) / rate))
    return np.clip(y, -1, 1), spans


def rows(found: list[tuple[float, float]], margin: float = 0.01) -> tuple[int, float]:
    """(rows detect writes for `found`, the longest row's seconds): as restoration.py groups them."""
    groups = _meeting([Damage(a, b, 0.0, "click") for a, b in found], margin)
    return len(groups), max((g[-1].end - g[0].start + 2 * margin for g in groups), default=0.0)


def restored(clean: np.ndarray, crackly: np.ndarray, rate: int, margin: float = 0.01) -> dict[str, tuple[float, float]]:
    """{way: (SNR dB over the rows' regions, CPU seconds)} for the rows detect writes for the
    clicks found in `crackly`, left as they are, rebuilt whole, and their damaged spans rebuilt."""
    found = find_clicks(Audio(crackly.astype(np.float32), rate, "WAV", "FLOAT"))
    groups = _meeting([Damage(d.start, d.end, 0.0, "click") for d in found], margin)
    audio = Audio(crackly.astype(np.float32), rate, "WAV", "FLOAT")
    engine = LocalEngine()
    error = {"as it is": 0.0, "whole": 0.0, "spans": 0.0}
    cpu = {"as it is": 0.0, "whole": 0.0, "spans": 0.0}
    signal = 0.0
    for group in groups:
        a, b = round((group[0].start - margin) * rate), round((group[-1].end + margin) * rate)
        truth = clean[a:b]
        signal += float(np.sum(truth**2))
        error["as it is"] += float(np.sum((truth - crackly[a:b]) ** 2))
        spans = [(d.start - CLICK_PAD_SECONDS, d.end + CLICK_PAD_SECONDS) for d in group]
        for way, damaged in (("whole", ()), ("spans", damaged_frames(spans, rate, a, b))):
            began = time.process_time()
            fill = engine.inpaint(InpaintRequest(audio, a, b, "x", damaged=damaged)).fill
            cpu[way] += time.process_time() - began
            error[way] += float(np.sum((truth - fill) ** 2))
    return {way: (10 * np.log10(signal / max(e, 1e-30)), cpu[way]) for way, e in error.items()}


def soundpatch_clicks(x: np.ndarray, rate: int) -> list[tuple[float, float]]:
    return [(d.start, d.end) for d in find_clicks(Audio(x.astype(np.float32), rate, "WAV", "FLOAT"))]


def difference_threshold(x: np.ndarray, rate: int) -> list[tuple[float, float]]:
    d = np.abs(np.diff(x, axis=0, prepend=x[:1])).max(axis=1)
    block = int(0.046 * rate)
    n = len(d) // block * block
    typical = np.repeat(np.median(d[:n].reshape(-1, block), axis=1), block)
    over = np.flatnonzero(d[:n] > 8 * np.maximum(typical, 1e-6))
    if not len(over):
        return []
    bursts = np.split(over, np.flatnonzero(np.diff(over) > round(0.002 * rate)) + 1)
    return [(g[0] / rate, (g[-1] + 1) / rate) for g in bursts]


def tally(found: list[tuple[float, float]], put: list[tuple[float, float]]) -> tuple[int, int]:
    """(clicks put in that something found overlaps, give or take 3 ms; spans found that overlap none)."""
    meet = lambda f, p: f[0] < p[1] + 0.003 and p[0] - 0.003 < f[1]  # noqa: E731
    return sum(any(meet(f, p) for f in found) for p in put), sum(not any(meet(f, p) for p in put) for f in found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each material")
    parser.add_argument("--clicks", type=int, default=60, help="clicks punched in, per material and band")
    parser.add_argument("--crackle", type=float, nargs="*", default=[20.0, 80.0], help="crackle's ticks a second")
    parser.add_argument("--restore-seconds", type=float, default=20.0, help="of each material, restored (0: none)")
    args = parser.parse_args()
    s = args.seconds
    materials = {
        "music 44.1k stereo": (demo_audio.music(s, 44100, 2, seed=3, smooth=True), 44100),
        "voice 16k mono": (demo_audio.voice(s, 16000, seed=5, smooth=True), 16000),
        "voice 44.1k mono": (demo_audio.voice(s, 44100, seed=6, smooth=True), 44100),
        "drums 44.1k stereo": (drums(s, 44100, seed=2), 44100),
        "effect 48k mono": (demo_audio.effect(2.5, 48000, seed=7), 48000),
    }
    detectors = {"soundpatch": soundpatch_clicks, "difference": difference_threshold}
    bands = " | ".join(f"{lo:+d}..{hi:+d} dB" for lo, hi in BANDS)
    head = f"found (false alarms), clicks at {bands} | pops at {POPS[0]:+d}..{POPS[1]:+d} dB"
    print(f"| material | detector | {head} | false alarms/min, clean | CPU s/min |")
    print("|---|---|" + "---|" * (len(BANDS) + 3))
    for name, (x, rate) in materials.items():
        x = x.astype(np.float64)
        minutes = len(x) / rate / 60
        count = max(3, min(args.clicks, int(len(x) / rate)))
        for label, detect in detectors.items():
            began = time.process_time()
            clean = detect(x, rate)
            cpu = (time.process_time() - began) / minutes
            rng = np.random.default_rng(1)
            cells = []
            for band in BANDS:
                y, at = punch(x, rate, count, band, rng)
                hit, false = tally(detect(y, rate), at)
                cells.append(f"{hit}/{count} ({false})")
            y, at = punch(x, rate, count, POPS, rng, smooth=True)
            hit, false = tally(detect(y, rate), at)
            cells.append(f"{hit}/{count} ({false})")
            print(f"| {name} | {label} | {' | '.join(cells)} | {len(clean) / minutes:.1f} | {cpu:.2f} |", flush=True)
    if not args.crackle:
        return

    def found_and_rows(x: np.ndarray, y: np.ndarray, at: list, rate: int) -> list[str]:
        found = soundpatch_clicks(y, rate)
        hit, false = tally(found, at)
        count, longest = rows(found)
        return [f"{hit}/{len(at)} ({false})", f"{count}, {1000 * longest:.0f} ms"]

    def restoring(x: np.ndarray, y: np.ndarray, at: list, rate: int) -> list[str]:
        (untouched, _), (whole, whole_cpu), (spans, spans_cpu) = restored(x, y, rate).values()
        return [f"{untouched:.1f}, {whole:.1f}, **{spans:.1f}** ({whole_cpu:.1f}, {spans_cpu:.1f})"]

    crackle_table(materials, args.crackle, "material", "found (false alarms) | rows, longest", found_and_rows)
    if args.restore_seconds:
        head = f"material, first {args.restore_seconds:g} s: SNR dB over the rows"
        cells = "as it is, whole, spans (CPU s whole, spans)"
        crackle_table(materials, args.crackle, head, cells, restoring, args.restore_seconds)


def crackle_table(
    materials: dict, rates: list[float], head: str, cells: str, cell, seconds: float | None = None
) -> None:
    """A table of a row a material and `cell(clean, crackly, ticks, rate)`'s columns for each
    crackle rate, over the first `seconds` of each material (all of it: None)."""
    print()
    print(f"| {head} | " + " | ".join(f"crackle {r:g}/s: {cells}" for r in rates) + " |")
    print("|---|" + "---|" * (len(rates) * (cells.count("|") + 1)))
    for name, (x, rate) in materials.items():
        x = x.astype(np.float64)[: None if seconds is None else int(seconds * rate)]
        x = x if x.ndim == 2 else x[:, None]
        row = []
        for per_second in rates:
            y, at = crackle(x, rate, per_second, np.random.default_rng(2))
            row += cell(x, y, at, rate)
        print(f"| {name} | {' | '.join(row)} |", flush=True)


if __name__ == "__main__":
    main()
