"""How MP3s are read: a block at a time (soundio), and without the tag that says their length."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from soundpatch import audio as audio_module
from soundpatch import soundio
from soundpatch.audio import decode, read_back

# LAME's encoder delay and libmpg123's decoder delay: where a tagged file's first sample is
# in a decode that knows neither.
DELAYS = 576 + 529


def frame_starts(data: bytes, at: int = 0) -> list[int]:
    """Where each Layer III frame of `data` starts (MPEG-1 and MPEG-2, as libsndfile writes)."""
    kbps = {3: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)}
    kbps[2] = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
    rates = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000)}
    starts = []
    while at + 4 <= len(data) and data[at] == 0xFF:
        version = (data[at + 1] >> 3) & 3
        rate = rates[version][(data[at + 2] >> 2) & 3]
        size = (144 if version == 3 else 72) * kbps[version][data[at + 2] >> 4] * 1000 // rate
        starts.append(at)
        at += size + ((data[at + 2] >> 1) & 1)
    return starts


def loud_then_quiet(seconds: float, rate: int, channels: int, loud: float = 0.05) -> np.ndarray:
    """Noise for `loud` seconds, then a soft tone: the first frames are dear, the rest cheap (VBR)."""
    t = np.arange(int(seconds * rate)) / rate
    x = 0.05 * np.sin(2 * np.pi * 330 * t)
    x[: int(loud * rate)] += 0.5 * np.random.default_rng(7).standard_normal(int(loud * rate))
    return np.repeat(x[:, None], channels, axis=1) * np.linspace(1, 0.5, channels)


def tagged_mp3(rate: int, channels: int, seconds: float = 8.0, loud: float = 0.05) -> bytes:
    out = io.BytesIO()
    sf.write(out, loud_then_quiet(seconds, rate, channels, loud), rate, format="MP3")
    return out.getvalue()


def libsndfile_alone(data: bytes) -> np.ndarray:
    with sf.SoundFile(io.BytesIO(data)) as f:
        return f.read(dtype="float32", always_2d=True)


def test_an_mp3_read_a_block_at_a_time_is_what_it_is_read_at_once(tmp_path):
    # soundfile seeks to where each read ended; libmpg123 took that for a seek and decoded
    # the two frames after every block from a frame before, without its bit reservoir: 0.06
    # off, on a tone of 0.05, at each 262,144 frames of every MP3 read.
    tagged = tagged_mp3(44100, 2, seconds=13.0)
    once = libsndfile_alone(tagged)
    assert len(once) > 2 * audio_module.BLOCK_FRAMES
    path = tmp_path / "long.mp3"
    path.write_bytes(tagged)
    assert np.array_equal(decode(tagged).samples, once) and np.array_equal(decode(path).samples, once)
    assert np.array_equal(np.concatenate(list(audio_module.stored(path).blocks(100_000))), once)
    assert np.array_equal(read_back(path, 0, len(once)).excerpt.samples, once)
    assert np.array_equal(soundio.read(tagged, dtype="float32", always_2d=True)[0], once)
