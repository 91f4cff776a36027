"""Regenerate the sample audio under manifests/audio/ and manifests/reels/ (committed, so
this is optional).

    python manifests/make_samples.py

Everything is synthesized (soundpatch.demo_audio), deterministic, and small.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import soundfile as sf

from soundpatch import demo_audio, metadata

HERE = Path(__file__).parent / "audio"
REELS = Path(__file__).parent / "reels"  # apart from audio/, the archive folder `detect` is shown on

# Damage punched into the restoration examples: (start s, end s, kind).
MUSIC_DAMAGE = [
    (2.73, 2.735, "click"),
    (4.2, 4.25, "dropout"),
    (9.1, 9.7, "dropout"),
    (5.31, 5.32, "dropout"),
]
VOICE_DAMAGE = [(1.7, 1.72, "dropout"), (3.05, 3.055, "click")]
REEL_STAMP = "10:00:00"  # when the interview reel's first sample was recorded (its bext time reference)


def damaged(x: np.ndarray, rate: int, damage: list[tuple[float, float, str]]) -> np.ndarray:
    x = x.copy()
    for start, end, kind in damage:
        a, b = round(start * rate), round(end * rate)
        if kind == "dropout":
            x[a:b] = 0.0
        else:  # a click: a burst of full-scale crackle
            x[a:b] = np.sign(np.sin(np.arange(b - a)))[:, None] * 0.9
    return x


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    music_rate, voice_rate = 22050, 16000
    music = demo_audio.music(12.0, music_rate, channels=2, seed=3)
    voice = demo_audio.voice(5.0, voice_rate, seed=5)
    sf.write(HERE / "music_damaged.flac", damaged(music, music_rate, MUSIC_DAMAGE), music_rate, subtype="PCM_16")
    sf.write(HERE / "voice_damaged.flac", damaged(voice, voice_rate, VOICE_DAMAGE), voice_rate, subtype="PCM_16")
    sf.write(HERE / "whoosh_impact.wav", demo_audio.effect(2.5, 48000, seed=7), 48000, subtype="PCM_16")
    REELS.mkdir(exist_ok=True)
    write_reel(REELS / "reel_interview.wav", damaged(voice, voice_rate, VOICE_DAMAGE), voice_rate)
    for p in sorted([*HERE.iterdir(), *REELS.iterdir()]):
        print(f"{p.relative_to(HERE.parent.parent)}  {p.stat().st_size / 1024:.0f} KiB")


def write_reel(path: Path, samples: np.ndarray, rate: int) -> None:
    """A broadcast WAV, as an archive's transfer is: its bext chunk says what it is and
    when its first sample was recorded (manifests/reel_edl.csv gives times in that clock)."""
    sf.write(path, samples, rate, subtype="PCM_16", format="WAV")
    hours, minutes, seconds = (int(x) for x in REEL_STAMP.split(":"))
    stamp = ((hours * 60 + minutes) * 60 + seconds) * rate
    bext = b"Interview, reel 3".ljust(256, b"\0") + b"soundpatch samples".ljust(32, b"\0") + bytes(32)
    bext += b"1994-06-21" + REEL_STAMP.encode() + struct.pack("<QH", stamp, 1) + bytes(254)
    bext += b"A=ANALOGUE,M=mono,T=Nagra IV-S\r\nA=PCM,F=16000,W=16,M=mono,T=transfer\r\n"
    metadata.put_into(path, "WAV", metadata.Carried("RIFF", ((b"bext", bext),)))


if __name__ == "__main__":
    main()
