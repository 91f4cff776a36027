"""Decoding and encoding audio in memory while other threads run Python, as a batch's rows do.

    python bench/audio_io.py [--busy 0 2 8] [--repeat 10]

For each format, with 0, 2 and 8 threads busy in Python: milliseconds (wall and this
thread's CPU) to encode and decode 6 s of 44.1 kHz stereo through a BytesIO (libsndfile
calls back into Python, taking the GIL, for every read and seek) and through
soundpatch.soundio (a file descriptor: libsndfile does its own I/O), and their ratio.
"""

from __future__ import annotations

import argparse
import io
import threading
import time

import numpy as np
import soundfile as sf

from soundpatch import soundio

FORMATS = (("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"))


def timed(fn, repeat: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - wall) / repeat * 1000, (time.thread_time() - cpu) / repeat * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 2, 8])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    pcm = (np.random.default_rng(0).standard_normal((6 * 44100, 2)) * 3000).astype(np.int16)
    print(f"{'busy':>4s} {'format':6s} {'step':6s} {'BytesIO ms':>16s} {'soundio ms':>16s} {'ratio':>6s}")
    print(f"{'':4s} {'':6s} {'':6s} {'wall':>8s}{'cpu':>8s} {'wall':>8s}{'cpu':>8s} {'wall':>6s}")
    for busy in args.busy:
        stop = threading.Event()

        def spin(stop: threading.Event = stop) -> None:
            while not stop.is_set():
                sum(i * i for i in range(2000))

        threads = [threading.Thread(target=spin, daemon=True) for _ in range(busy)]
        for t in threads:
            t.start()
        try:
            for fmt, subtype in FORMATS:
                samples = pcm if subtype.startswith("PCM") else (pcm / 32768).astype(np.float32)
                data = soundio.write(samples, 44100, fmt, subtype)
                steps = {
                    "encode": (
                        lambda: sf.write(io.BytesIO(), samples, 44100, format=fmt, subtype=subtype),  # noqa: B023
                        lambda: soundio.write(samples, 44100, fmt, subtype),  # noqa: B023
                    ),
                    "decode": (
                        lambda: sf.read(io.BytesIO(data)),  # noqa: B023
                        lambda: soundio.read(data),  # noqa: B023
                    ),
                }
                for step, (theirs, ours) in steps.items():
                    (w0, c0), (w1, c1) = timed(theirs, args.repeat), timed(ours, args.repeat)
                    print(f"{busy:4d} {fmt:6s} {step:6s} {w0:8.1f}{c0:8.1f} {w1:8.1f}{c1:8.1f} {w1 / w0:6.2f}")
        finally:
            stop.set()
            for t in threads:
                t.join()


if __name__ == "__main__":
    main()
