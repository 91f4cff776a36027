"""Regenerate the sample audio under manifests/audio/ (committed, so this is optional).

    python manifests/make_samples.py

Everything is synthesized (soundpatch.demo_audio), deterministic, and small.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from soundpatch import demo_audio

HERE = Path(__file__).parent / "audio"

# Damage punched into the restoration examples: (start s, end s, kind).
MUSIC_DAMAGE = [
    (2.73, 2.735, "click"),
    (4.2, 4.25, "dropout"),
    (9.1, 9.7, "dropout"),
    (5.31, 5.32, "dropout"),
]
VOICE_DAMAGE = [(1.7, 1.72, "dropout"), (3.05, 3.055, "click")]


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
    for p in sorted(HERE.iterdir()):
        print(f"{p.relative_to(HERE.parent.parent)}  {p.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
