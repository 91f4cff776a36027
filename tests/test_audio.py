from __future__ import annotations

import io
import re

import numpy as np
import pytest
import soundfile as sf

import soundpatch.audio as audio_module
from soundpatch.audio import (
    Audio,
    AudioInfo,
    check_encodable,
    cut_short,
    decode,
    encode,
    equal_power_ramps,
    inspect,
    max_diff,
    never_finished,
    patch,
    read_back,
    region_frames,
    splice,
    to_float,
)
from soundpatch.errors import RowError


def file_bytes(samples: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(seconds: float, rate: int, channels: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    sig = 0.5 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(0).standard_normal(len(t))
    return np.stack([sig * (1 - 0.1 * c) for c in range(channels)], axis=1).astype(np.float32)


@pytest.mark.parametrize(
    ("fmt", "subtype", "rate", "channels"),
    [
        ("WAV", "PCM_16", 48000, 1),
        ("WAV", "PCM_24", 44100, 2),
        ("WAV", "PCM_32", 96000, 2),
        ("WAV", "FLOAT", 22050, 6),
        ("FLAC", "PCM_16", 44100, 2),
        ("FLAC", "PCM_24", 8000, 1),
        ("AIFF", "PCM_16", 32000, 4),
        ("WAV", "PCM_U8", 11025, 1),
    ],
)
def test_outside_the_region_is_bit_identical_after_a_round_trip(fmt, subtype, rate, channels):
    data = file_bytes(tone(2.0, rate, channels), rate, fmt, subtype)
    original = decode(data)
    a, b = region_frames(0.7, 1.3, rate, original.frames)
    fill = tone((b - a) / rate, rate, channels, freq=1234.0)[: b - a]
    result = splice(original, fill, a, b, crossfade=round(0.01 * rate))
    written = encode(result, fmt)
    with sf.SoundFile(io.BytesIO(written)) as f:
        assert (f.samplerate, f.channels, f.frames, f.subtype) == (rate, channels, original.frames, subtype)
    # Compare what a user would read from both files, raw, sample for sample.
    before = sf.read(io.BytesIO(data), dtype="int32" if subtype != "FLOAT" else "float32", always_2d=True)[0]
    after = sf.read(io.BytesIO(written), dtype="int32" if subtype != "FLOAT" else "float32", always_2d=True)[0]
    assert np.array_equal(before[:a], after[:a])
    assert np.array_equal(before[b:], after[b:])
    assert not np.array_equal(before[a:b], after[a:b])


def test_compressed_inputs_decode_and_write_back_at_their_rate_and_layout():
    sig = tone(3.0, 44100, 2)
    for fmt, subtype in (("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")):
        original = decode(file_bytes(sig, 44100, fmt, subtype))
        assert original.rate == 44100 and original.channels == 2
        assert original.samples.dtype == np.float32
        a, b = region_frames(1.0, 1.5, 44100, original.frames)
        result = splice(original, np.zeros((b - a, 2), np.float32), a, b, 441)
        wav = sf.read(io.BytesIO(encode(result, "WAV")), dtype="float32", always_2d=True)[0]
        # A float WAV keeps the decoded samples exactly outside the region.
        assert np.array_equal(wav[:a], original.samples[:a])
        assert np.array_equal(wav[b:], original.samples[b:])


def test_equal_power_ramps_keep_power_constant():
    out_, in_ = equal_power_ramps(480)
    assert np.allclose(out_**2 + in_**2, 1.0, atol=1e-6)
    assert out_[0, 0] > 0.99 and in_[-1, 0] > 0.99


def max_step(x: np.ndarray) -> float:
    return float(np.max(np.abs(np.diff(x, axis=0))))


def test_seams_have_no_clicks_even_when_the_fill_does_not_match():
    rate = 48000
    sig = tone(2.0, rate, 2, freq=220.0)
    original = decode(file_bytes(sig, rate, "WAV", "PCM_24"))
    a, b = region_frames(0.5, 1.0, rate, original.frames)
    # A fill that jumps: a DC offset of 0.6 and another pitch. Spliced bare, it clicks.
    fill = (0.6 + 0.3 * np.sin(2 * np.pi * 3000 * np.arange(b - a) / rate))[:, None].repeat(2, 1)
    fill = fill.astype(np.float32)
    bare = to_float(splice(original, fill, a, b, crossfade=0).samples)
    faded = to_float(splice(original, fill, a, b, crossfade=480).samples)
    typical = max(max_step(to_float(original.samples)), max_step(fill))
    seam = slice(a - 2, a + 2), slice(b - 2, b + 2)
    assert max(max_step(bare[s]) for s in seam) > 2 * typical  # the test can fail
    assert max(max_step(faded[s]) for s in seam) <= 1.05 * typical


def test_splice_rejects_a_fill_of_the_wrong_shape():
    original = decode(file_bytes(tone(1.0, 8000, 1), 8000, "WAV", "PCM_16"))
    with pytest.raises(ValueError):
        splice(original, np.zeros((10, 2), np.float32), 100, 120, 0)


@pytest.mark.parametrize("content", [b"", b"RIFF\x00\x00\x00\x00WAVEfmt ", b"hello, I am text, not audio" * 10])
def test_undecodable_bytes_raise_a_row_error(content):
    with pytest.raises(RowError):
        decode(content, "clip.wav")


@pytest.mark.parametrize(
    ("fmt", "subtype", "channels"),
    [
        ("WAV", "PCM_16", 1),
        ("WAV", "PCM_24", 2),
        ("WAV", "FLOAT", 2),
        ("AIFF", "PCM_16", 2),
        ("W64", "PCM_24", 2),
        ("RF64", "PCM_16", 1),
        ("RF64", "FLOAT", 2),
        ("MP3", "MPEG_LAYER_III", 1),
    ],
)
def test_a_file_cut_short_is_read_as_far_as_it_goes_and_says_how_far_that_is(fmt, subtype, channels):
    """A copy broken off keeps a header promising all of it: libsndfile reads a WAV or AIFF as
    far as its samples go, and an MP3 until its frames run out, saying nothing of it."""
    rate = 16000
    data = file_bytes(tone(6.0, rate, channels), rate, fmt, subtype)
    whole = decode(data, "take.x")
    cut = data[: len(data) * 6 // 10]
    for info in (inspect(cut, "take.x"), decode(cut, "take.x").info):
        assert info.promised_frames == whole.frames  # within a frame of what the header says
        assert 0.5 * whole.frames < info.frames < 0.65 * whole.frames
        said = cut_short(info)
        assert said == f"{info.duration:.3f} s of the 6.000 s its header promises"
    short = decode(cut, "take.x")
    if fmt != "MP3":  # what there is, as it is
        assert np.array_equal(short.samples, whole.samples[: short.frames])
    assert inspect(data).promised_frames is None and whole.promised_frames is None and cut_short(whole.info) is None


@pytest.mark.parametrize("unknown", [0xFFFFFFFF, 0x7FFFF000])
def test_a_wav_written_to_a_pipe_is_not_cut_short(unknown):
    """A writer that did not know the length yet puts a placeholder where the data size goes."""
    data = bytearray(file_bytes(tone(1.0, 8000, 1), 8000, "WAV", "PCM_16"))
    at = data.index(b"data") + 4
    data[at : at + 4] = unknown.to_bytes(4, "little")
    assert inspect(bytes(data)).promised_frames is None and decode(bytes(data)).promised_frames is None
    assert decode(bytes(data)).frames == 8000


@pytest.mark.parametrize(("subtype", "channels"), [("PCM_16", 1), ("PCM_24", 2), ("FLOAT", 2), ("PCM_U8", 1)])
def test_a_wav_whose_header_was_never_finished_is_read_to_its_end(tmp_path, subtype, channels):
    """A recorder that lost power before writing the length leaves a header saying the file
    holds nothing (libsndfile: no samples), with the recording after it."""
    rate = 16000
    data = file_bytes(tone(3.0, rate, channels), rate, "WAV", subtype)
    whole = decode(data)
    unfinished = bytearray(data)
    at = unfinished.index(b"data") + 4
    unfinished[at : at + 4] = bytes(4)  # "data : 0"
    unfinished[4:8] = bytes(4)  # and so the RIFF's size, as such a recorder leaves it
    (tmp_path / "take.wav").write_bytes(unfinished)
    for read in (decode(bytes(unfinished)), decode(tmp_path / "take.wav")):
        assert np.array_equal(read.samples, whole.samples) and read.promised_frames == 0
        assert never_finished(read.info) == "it says it holds no samples; the 3.000 s that follow it were read"
        assert cut_short(read.info) is None
    for info in (inspect(bytes(unfinished)), inspect(str(tmp_path / "take.wav"))):
        assert (info.frames, info.promised_frames) == (3 * rate, 0)
    assert never_finished(whole.info) is None and never_finished(inspect(data)) is None
    with pytest.raises(RowError, match="holds no audio samples"):  # a header, and nothing after it
        decode(bytes(unfinished[: at + 4]), "take.wav")


def test_a_flac_cut_short_is_refused_saying_how_far_it_decodes():
    """libsndfile stops a FLAC at the first frame it cannot decode, with an error; what
    follows may be good audio (damage, not an end), so the file is refused, not cut there."""
    rate = 16000
    data = file_bytes(tone(6.0, rate, 2), rate, "FLAC", "PCM_16")
    cut = data[: len(data) * 6 // 10]
    for read in (inspect, decode):
        with pytest.raises(RowError) as caught:
            read(cut, "input file take.flac")
        said = re.fullmatch(
            r"input file take\.flac cannot be decoded past (\d\.\d{3}) s of the 6\.000 s its header promises "
            r"\([^)]+\): it is cut short or damaged there",
            str(caught.value),
        )
        assert said is not None, str(caught.value)
        assert 2.5 < float(said[1]) < 3.6  # 60% of the bytes, less its last partial frame
    assert inspect(data).frames == 6 * rate


def test_in_memory_files_match_soundfile_and_leave_no_descriptor_open():
    """soundio hands libsndfile a file descriptor instead of a BytesIO (no callbacks into
    Python): the same bytes and samples as soundfile's own, and every descriptor closed."""
    import os

    from soundpatch import soundio

    samples = (np.random.default_rng(3).standard_normal((44100, 2)) * 3000).astype(np.int16)
    open_before = len(os.listdir("/proc/self/fd"))
    for fmt in ("WAV", "FLAC"):
        data = soundio.write(samples, 44100, fmt, "PCM_16")
        theirs = io.BytesIO()
        sf.write(theirs, samples, 44100, format=fmt, subtype="PCM_16")
        assert data == theirs.getvalue()
        back, rate = soundio.read(data, dtype="int16", always_2d=True)
        assert rate == 44100 and np.array_equal(back, samples)
    for _ in range(50):
        with pytest.raises(sf.LibsndfileError):
            soundio.read(b"RIFF" + os.urandom(500))
    assert len(os.listdir("/proc/self/fd")) == open_before


@pytest.mark.parametrize(
    ("info", "container", "reason"),
    [
        (AudioInfo(48000 * 10, 48000, 6, "WAV", "PCM_16"), "MP3", "it holds at most 2 channels"),
        (AudioInfo(96000 * 10, 96000, 2, "WAV", "PCM_24"), "MP3", "only supports sample rates of 8000"),
        (AudioInfo(192000 * 10, 192000, 1, "WAV", "PCM_24"), "MP3", "recording (1 channel at 192000 Hz)"),
        (AudioInfo(48000 * 10, 48000, 10, "WAV", "PCM_16"), "FLAC", "it holds at most 8 channels"),
        # Four hours of a 96 kHz, 24-bit stereo transfer: 7.7 GB, past what AIFF's sizes can say
        # (a WAV's neither: it is written as RF64, test_metadata).
        (AudioInfo(4 * 3600 * 96000, 96000, 2, "WAV", "PCM_24"), "AIFF", "7.7 GB of samples, where one AIFF file"),
        (AudioInfo(4 * 3600 * 96000, 96000, 2, "WAV", "PCM_24"), "WAV", None),
        (AudioInfo(4 * 3600 * 96000, 96000, 2, "WAV", "PCM_24"), "FLAC", None),
        (AudioInfo(3600 * 48000, 48000, 2, "WAV", "PCM_24"), "WAV", None),  # an hour: 1 GB
        (AudioInfo(48000 * 10, 48000, 6, "WAV", "PCM_16"), "OGG", None),
    ],
)
def test_an_output_format_that_cannot_hold_a_recording_is_known_before_anything_is_made(info, container, reason):
    if reason is None:
        check_encodable(info, container)
        return
    with pytest.raises(RowError, match=re.escape(reason)):
        check_encodable(info, container)


@pytest.mark.parametrize(
    ("fmt", "subtype", "region"),
    [("WAV", "PCM_16", (0.31, 0.47)), ("FLAC", "PCM_24", (0.2, 0.9)), ("OGG", "VORBIS", (0.5, 0.6))],
)
def test_a_patched_recording_is_written_and_read_back_a_block_at_a_time(monkeypatch, fmt, subtype, region):
    # Blocks of 1000 frames, so the region and its context straddle several.
    monkeypatch.setattr(audio_module, "BLOCK_FRAMES", 1000)
    rate = 8000
    original = decode(file_bytes(tone(1.0, rate, 2), rate, fmt, subtype))
    a, b = region_frames(*region, rate, original.frames)
    fill = tone((b - a) / rate, rate, 2, freq=777.0)[: b - a]
    patched = patch(original, fill, a, b, crossfade=40)
    whole = splice(original, fill, a, b, crossfade=40)
    assert np.array_equal(patched.audio().samples, whole.samples)
    written = encode(patched, fmt)
    published = decode(written)
    assert published.samples.dtype == whole.samples.dtype
    if fmt != "OGG":  # lossless: what was written is the splice, sample for sample
        assert np.array_equal(published.samples, whole.samples)
    lo, hi = a - 1500, b + 1500
    back = read_back(written, lo, hi, against=(original, a, b))
    assert back.frames == published.frames and back.lo == lo
    assert np.array_equal(back.excerpt.samples, published.samples[lo:hi])
    expected = max(
        max_diff(original.samples[:a], published.samples[:a]), max_diff(original.samples[b:], published.samples[b:])
    )
    assert back.outside_max_diff == expected
    assert (back.outside_max_diff == 0.0) == (fmt != "OGG")


def test_reading_back_finds_a_change_outside_the_region_in_any_block(monkeypatch):
    monkeypatch.setattr(audio_module, "BLOCK_FRAMES", 1000)
    rate = 8000
    original = decode(file_bytes(tone(1.0, rate, 2), rate, "WAV", "PCM_16"))
    a, b = 2000, 2400
    changed = original.samples.copy()
    changed[7321, 1] += 3  # far past the region, in the eighth block
    back = read_back(encode(Audio(changed, rate, "WAV", "PCM_16"), "WAV"), a, b, against=(original, a, b))
    assert back.outside_max_diff == pytest.approx(3 / 2**15)
    assert back.excerpt.frames == b - a


@pytest.mark.parametrize(
    ("subtype", "container", "said"),
    [
        ("FLOAT", "FLAC", "32-bit float: rounded to 24 bits, and anything over full scale clipped"),
        ("PCM_32", "FLAC", "32-bit: rounded to 24 bits"),
        ("MPEG_LAYER_III", "AIFF", "MP3: rounded to 24 bits, and anything over full scale clipped"),
        ("PCM_24", "FLAC", None),
        ("PCM_U8", "FLAC", None),
        ("IMA_ADPCM", "FLAC", None),  # decoded as floats, on a 16-bit grid
        ("DOUBLE", "WAV", None),
        ("VORBIS", "WAV", None),  # into a float WAV
        ("FLOAT", "MP3", None),  # lossy by choice
    ],
)
def test_what_an_output_format_does_to_samples_it_cannot_hold(subtype, container, said):
    info = audio_module.AudioInfo(100, 44100, 2, "WAV", subtype)
    assert audio_module.rounded_in(info, container) == said


@pytest.mark.parametrize("subtype", ["IMA_ADPCM", "MS_ADPCM", "GSM610"])
@pytest.mark.parametrize(("container", "written"), [("WAV", "PCM_16"), ("FLAC", "PCM_16")])
def test_a_codec_on_a_16_bit_grid_comes_back_as_16_bit_pcm_with_the_rest_as_it_decodes(subtype, container, written):
    # Voice recorders' IMA ADPCM WAVs and the like decode to 16-bit integers. They were read
    # as floats and written as 32-bit float WAVs: exact, and twice the size.
    rate = 8000
    data = file_bytes(tone(2.0, rate, 1), rate, "WAV", subtype)
    original = decode(data)
    assert original.samples.dtype == np.int16
    a, b = region_frames(0.7, 1.3, rate, original.frames)
    result = splice(original, tone((b - a) / rate, rate, 1, freq=1234.0)[: b - a], a, b, crossfade=80)
    written_bytes = encode(result, container)
    assert sf.info(io.BytesIO(written_bytes)).subtype == written
    before = sf.read(io.BytesIO(data), dtype="int16")[0]
    after = sf.read(io.BytesIO(written_bytes), dtype="int16")[0]
    assert len(after) == len(before)
    assert np.array_equal(before[:a], after[:a]) and np.array_equal(before[b:], after[b:])
