"""How well and how fast the embedded engine restores gaps, against simple baselines.

    python bench/local_engine.py [--trials 6] [--minutes 4]

For each material and gap length: mean SNR inside the gap (engine, zero-fill, linear
interpolation, measured on the same gaps in the same run), the engine's fill level against
what the gap held (dB: 0 is as loud; a fill that fades out reads well under it) and
milliseconds per edit. On hiss no fill can predict the samples (SNR at 0 dB or under
whatever it does): there the level says whether the gap was left a hole.
The last material is a long recording (`--minutes`, 0 for none), at the gaps where the
engine probes which method to use: a row of a long tape searches 90 s either side.

Then dropouts as `detect` writes their rows: the region is the dropout and the splice's
10 ms each side; mean SNR over the region with all of it rebuilt (before rows named their
`damaged` spans) and with the dropout alone (its span), same dropouts.
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

    print()
    print(f"{'dropout rows':20s} {'dropout':>7s} {'region dB':>10s} {'dropout alone dB':>17s}")
    for name, (x, rate, _) in list(materials.items())[:2]:
        for gap in (0.005, 0.01, 0.02):
            region, alone = dropout_rows(x if x.ndim == 2 else x[:, None], rate, gap, args.trials * 2)
            print(f"{name:20s} {gap * 1000:5.0f}ms {region:10.1f} {alone:17.1f}")


def dropout_rows(x: np.ndarray, rate: int, gap: float, trials: int, margin: float = 0.01) -> tuple[float, float]:
    """SNR (dB) over `trials` dropout rows' regions where the material is heard (its energy
    over theirs, summed): rebuilt whole, and the dropout alone."""
    engine, m, pad = LocalEngine(), round(gap * rate), round(margin * rate)
    signal, error = 0.0, {"region": 0.0, "alone": 0.0}
    for at in np.random.default_rng(7).integers(rate, len(x) - rate, 4 * trials):
        a, b = at - pad, at + m + pad
        truth = x[a:b].astype(np.float64)
        if np.mean(truth**2) < 1e-5:  # a pause: no dropout there to speak of (-50 dBFS)
            continue
        holed = x.astype(np.float32)
        holed[at : at + m] = 0.0
        signal += float(np.sum(truth**2))
        for way, damaged in (("region", ()), ("alone", ((at, at + m),))):
            fill = engine.inpaint(InpaintRequest(Audio(holed, rate, "WAV", "FLOAT"), a, b, "", damaged=damaged)).fill
            error[way] += float(np.sum((truth - fill) ** 2))
        trials -= 1
        if not trials:
            break
    return 10 * np.log10(signal / error["region"]), 10 * np.log10(signal / error["alone"])


if __name__ == "__main__":
    main()
