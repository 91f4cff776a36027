"""Finding dropouts (soundpatch/dropouts.py), against the damage the samples were made with."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest

from manifests.make_samples import MUSIC_DAMAGE, VOICE_DAMAGE
from soundpatch import demo_audio
from soundpatch.audio import Audio, decode
from soundpatch.dropouts import find_dropouts
from soundpatch.restoration import Damage, restoration_manifest

AUDIO = Path(__file__).resolve().parents[1] / "manifests" / "audio"


def found(audio: Audio, **kw) -> list[tuple[float, float]]:
    return [(round(d.start, 3), round(d.end, 3)) for d in find_dropouts(audio, **kw)]


@pytest.mark.parametrize(
    ("name", "damage"), [("music_damaged.flac", MUSIC_DAMAGE), ("voice_damaged.flac", VOICE_DAMAGE)]
)
def test_the_dropouts_punched_into_the_samples_are_found_and_nothing_else(name, damage):
    # The voice falls silent between its syllables too, to digital zero: those are pauses
    # (sound fades into them and rises out of them), and the clicks are not dropouts.
    audio = decode((AUDIO / name).read_bytes())
    assert found(audio) == sorted((a, b) for a, b, kind in damage if kind == "dropout")


def test_silence_at_either_end_short_gaps_and_gaps_in_quiet_audio_are_not_dropouts():
    rate = 16000
    loud = demo_audio.music(3.0, rate, channels=1, seed=1)
    x = np.concatenate([np.zeros((rate // 2, 1)), loud, np.zeros((rate // 2, 1))]).astype(np.float32)
    x[rate : rate + 64] = 0  # 4 ms
    x[2 * rate : 2 * rate + 160] = 0  # 10 ms
    quiet = x.copy()
    quiet[rate // 2 : -rate // 2] *= 10 ** (-60 / 20)  # the same, 60 dB down: under -50 dBFS around the gaps
    audio = lambda samples: Audio(samples, rate, "WAV", "FLOAT")  # noqa: E731
    assert found(audio(x)) == [(2.0, 2.01)]
    assert found(audio(x), min_seconds=0.003) == [(1.0, 1.004), (2.0, 2.01)]
    assert found(audio(quiet)) == []
    pcm = Audio(np.round(x * 32767).astype(np.int16), rate, "WAV", "PCM_16")  # as read from a 16-bit file
    assert found(pcm) == [(2.0, 2.01)]


def test_the_manifest_widens_each_region_by_the_crossfade_and_keeps_each_recording_s_place():
    found = [
        ("/archive/a/take.wav", Damage(1.0, 1.05, 10.0)),
        ("/archive/a/take.wav", Damage(1.065, 1.07, 10.0)),  # their widened regions meet: one row
        ("/archive/a/take.wav", Damage(9.995, 9.999, 10.0)),  # widened to the end, not past it
        ("/archive/b/take.wav", Damage(1.0, 1.05, 10.0)),  # another album's take.wav: its own id and file
        ("s3://bucket/c.flac", Damage(0.005, 0.2, 3.0)),
    ]
    text = restoration_manifest(found, "/archive/a", "fill it", margin_seconds=0.01)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["id"], r["input"], r["start"], r["end"], r["output"]) for r in rows] == [
        ("take-dropout-1.000s", "take.wav", "0.9900", "1.0800", "{run_id}/a/{stem}"),
        ("take-dropout-9.995s", "take.wav", "9.9850", "10.0000", "{run_id}/a/{stem}"),
        ("take-dropout-1.000s-2", "../b/take.wav", "0.9900", "1.0600", "{run_id}/b/{stem}"),
        ("c-dropout-0.005s", "s3://bucket/c.flac", "0.0000", "0.2100", "{run_id}/{stem}"),
    ]
    assert rows[0]["note"] == "2 dropouts, 55 ms in all, at 1.000 s" and {r["prompt"] for r in rows} == {"fill it"}
