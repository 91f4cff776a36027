"""How well and how fast the embedded engine restores gaps, against simple baselines.

    python bench/local_engine.py [--trials 6] [--minutes 4]

For each material and gap length: mean SNR inside the gap (engine, zero-fill, linear
interpolation, measured on the same gaps in the same run), the engine's fill level against
what the gap held (dB: 0 is as loud; a fill that fades out reads well under it) and
milliseconds per edit. On hiss no fill can predict the samples (SNR at 0 dB or under
whatever it does): there the level says whether the gap was left a hole.
The last material is a long recording (`--minutes`, 0 for none), at the gaps where the
engine probes which method to use: a row of a long tape searches 90 s either side.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from soundpatch import demo_audio
from soundpatch.audio import Audio
from soundpatch.engine import toeplitz
from soundpatch.engine.evaluation import compare, linear_fill, zero_fill
from soundpatch.providers.base import InpaintRequest
from soundpatch.providers.local import LocalEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--minutes", type=float, default=4.0, help="the long recording's length")
    args = parser.parse_args()
    toeplitz.prepare()  # the compiled solver, loaded (or compiled, the first time) before any edit is timed
    every = (0.005, 0.02, 0.05, 0.1, 0.3, 1.0)
    materials = {
        "music 44.1k stereo": (demo_audio.music(30.0, 44100, 2, seed=1), 44100, every),
        "voice 16k mono": (demo_audio.voice(30.0, 16000, seed=2), 16000, every),
        "hiss 44.1k stereo": (0.01 * np.random.default_rng(4).standard_normal((30 * 44100, 2)), 44100, every),
    }
    if args.minutes > 0:
        long = demo_audio.music(args.minutes * 60, 44100, 2, seed=1)
        materials[f"music {args.minutes:g} min"] = (long, 44100, (0.03, 0.05, 0.1))
    print(
        f"{'material':20s} {'gap':>7s} {'engine dB':>10s} {'zero dB':>8s} {'linear dB':>10s} "
        f"{'vs linear':>10s} {'level dB':>9s} {'ms/edit':>8s}"
    )
    for name, (x, rate, gaps) in materials.items():
        engine = LocalEngine()
        timings: list[float] = []
        levels: list[float] = []

        def fill(holed: np.ndarray, a: int, b: int, rate=rate, engine=engine, timings=timings, levels=levels, x=x):
            t0 = time.perf_counter()
            out = engine.inpaint(InpaintRequest(Audio(holed, rate, "WAV", "FLOAT"), a, b, "")).fill
            timings.append(time.perf_counter() - t0)
            levels.append(10 * np.log10(np.mean(np.square(out, dtype=np.float64)) / np.mean(np.square(x[a:b]))))
            return out

        for gap in gaps:
            timings.clear()
            levels.clear()
            r = compare(x, rate, gap, {"engine": fill, "zero": zero_fill, "linear": linear_fill}, trials=args.trials)
            print(
                f"{name:20s} {gap * 1000:5.0f}ms {r['engine']:10.1f} {r['zero']:8.1f} {r['linear']:10.1f} "
                f"{r['engine'] - r['linear']:+10.1f} {np.mean(levels):+9.1f} {np.mean(timings) * 1000:8.0f}"
            )


if __name__ == "__main__":
    main()
