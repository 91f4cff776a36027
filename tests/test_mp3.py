"""How MP3s are read: a block at a time (soundio), and without the tag that says their length."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from soundpatch import audio as audio_module
from soundpatch import soundio
from soundpatch.audio import decode, header_info, inspect, read_back
from soundpatch.errors import RowError
from soundpatch.mp3_length import given_length
from soundpatch.ranged import BLOCK_BYTES, RangedFile

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


@pytest.mark.parametrize(("rate", "channels", "spf"), [(44100, 2, 1152), (22050, 1, 576)])
@pytest.mark.parametrize("as_path", [False, True])
def test_an_mp3_without_its_length_tag_is_read_whole_where_libsndfile_reads_a_part(
    tmp_path, rate, channels, spf, as_path
):
    tagged = tagged_mp3(rate, channels)
    starts = frame_starts(tagged)
    untagged = tagged[starts[1] :]  # the info tag's frame left out: what an encoder without one writes
    complete = decode(tagged).samples
    alone = libsndfile_alone(untagged)
    assert len(alone) < 0.6 * len(complete)  # its estimate, from the dear first frame: the rest is lost

    source: bytes | Path = untagged
    if as_path:
        source = tmp_path / "take.mp3"
        source.write_bytes(untagged)
    info = inspect(untagged if not as_path else str(source), "take.mp3")
    audio = decode(source, "take.mp3")
    assert info.frames == audio.frames == (len(starts) - 1) * spf and info.promised_frames is None
    # Every sample where libsndfile puts them without the tag, and all the rest after them:
    # the tagged file's own decode, after the encoder's and the decoder's delays. (Mostly to
    # the last bit; libmpg123 rounds some floats' last bit or two differently once it knows
    # the length: 2.4e-7 at most, where a 24-bit step is 1.2e-7.)
    assert np.allclose(audio.samples[: len(alone)], alone, rtol=0, atol=5e-7)
    assert np.allclose(audio.samples[DELAYS : DELAYS + len(complete)], complete, rtol=0, atol=5e-7)
    # Read back a block at a time (results are checked so), as whole as decoded at once.
    back = read_back(source, 0, audio.frames)
    assert back.frames == audio.frames and np.array_equal(back.excerpt.samples, audio.samples)


def test_an_mp3_cut_out_of_a_stream_is_refused_where_it_would_be_read_short(tmp_path):
    # Cut at a frame whose data begins in the frames before it (the bit reservoir), which
    # are not there: given the made frames, libmpg123 would decode bursts of noise from them.
    tagged = tagged_mp3(44100, 2, loud=1.0)
    starts = frame_starts(tagged)
    cut = tagged[starts[20] :]
    assert cut[4] != 0  # main_data_begin: this frame's data begins in the frames before it
    seconds, read = (len(starts) - 20) * 1152 / 44100, len(libsndfile_alone(cut)) / 44100
    assert read < 0.5 * seconds
    path = tmp_path / "cut.mp3"
    path.write_bytes(cut)
    said = (
        f"cut.mp3 cannot be read whole: it is an MP3 cut out of a longer stream, with no tag saying its length: "
        f"it holds {seconds:.3f} s and libsndfile reads {read:.3f} s of it (make it a WAV or FLAC, or an MP3 "
        "with its tag, to use it whole)"
    )
    for read_it in (
        lambda: inspect(str(path), "cut.mp3"),
        lambda: decode(path, "cut.mp3"),
        lambda: decode(cut, "cut.mp3"),
    ):
        with pytest.raises(RowError) as refused:
            read_it()
        assert str(refused.value) == said


def test_an_id3_tag_before_the_first_frame_is_stepped_over(tmp_path):
    # An ID3v2 tag of 70 kB (cover art): larger than what is read to find the first frame.
    untagged = tagged_mp3(44100, 1, seconds=4.0)
    untagged = untagged[frame_starts(untagged)[1] :]
    size = 70_000
    syncsafe = bytes(((size >> 21) & 0x7F, (size >> 14) & 0x7F, (size >> 7) & 0x7F, size & 0x7F))
    with_id3 = b"ID3\x04\x00\x00" + syncsafe + bytes(size) + untagged
    path = tmp_path / "art.mp3"
    path.write_bytes(with_id3)
    whole = decode(untagged)
    for source in (with_id3, path):
        audio = decode(source)
        assert audio.frames == whole.frames and np.array_equal(audio.samples, whole.samples)
    assert inspect(str(path)).frames == whole.frames


def test_files_that_say_their_length_are_read_as_they_are(tmp_path):
    tagged = tagged_mp3(44100, 2, seconds=2.0)
    wav = io.BytesIO()
    sf.write(wav, loud_then_quiet(1.0, 8000, 1), 8000, format="WAV")
    for data in (tagged, wav.getvalue()):
        with soundio.open_bytes(data) as f:
            assert given_length(f, data) is None
    path = tmp_path / "tagged.mp3"
    path.write_bytes(tagged)
    with sf.SoundFile(str(path)) as f:
        assert given_length(f, path) is None
    assert np.array_equal(decode(tagged).samples, libsndfile_alone(tagged))


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


def test_an_mp3_without_its_tag_whose_first_frame_is_cheap_is_not_taken_for_cut_short():
    # Silence, then noise: libmpg123's estimate from the cheap first frame is far too long,
    # the decoder runs out of frames before it, and the file looked cut short.
    rate = 44100
    x = np.zeros((4 * rate, 1))
    x[rate // 2 :, 0] = 0.3 * np.random.default_rng(3).standard_normal(len(x) - rate // 2)
    out = io.BytesIO()
    sf.write(out, x, rate, format="MP3")
    tagged = out.getvalue()
    starts = frame_starts(tagged)
    untagged = tagged[starts[1] :]
    with sf.SoundFile(io.BytesIO(untagged)) as f:
        assert f.frames > 2 * len(x)  # what libsndfile says it holds
    for info in (inspect(untagged), decode(untagged).info):
        assert info.frames == (len(starts) - 1) * 1152 and info.promised_frames is None
    whole = decode(untagged).samples[DELAYS : DELAYS + len(x)]
    assert np.allclose(whole, decode(tagged).samples, rtol=0, atol=5e-7)  # (a float's last bit, as above)


def test_an_mp3_s_header_read_by_ranges_tells_its_length_only_where_its_tag_says_it_whole():
    # What a remote MP3's header tells, read a block at a time (ranged.py): its tag's frames,
    # where the tag counts its bytes too and the file holds them all; else None (downloaded).
    def encoded(rate: int, channels: int, **options: str) -> bytes:
        out = io.BytesIO()
        with sf.SoundFile(out, "w", rate, channels, format="MP3", **options) as f:
            f.write(loud_then_quiet(10.0, rate, channels))
        return out.getvalue()

    cbr = encoded(44100, 2, bitrate_mode="CONSTANT")  # an "Info" tag
    mono = encoded(22050, 1)  # MPEG-2, a "Xing" tag
    size = 70_000  # an ID3v2 tag (cover art) before the first frame: more than a block
    syncsafe = bytes(((size >> 21) & 0x7F, (size >> 14) & 0x7F, (size >> 7) & 0x7F, size & 0x7F))
    with_id3 = b"ID3\x04\x00\x00" + syncsafe + bytes(size) + cbr
    told = {"cbr": cbr, "mono": mono, "id3": with_id3}
    untold = {"untagged": mono[frame_starts(mono)[1] :], "cut": cbr[:-5000], "id3 cut": with_id3[:-5000]}
    for name, data in {**told, **untold}.items():
        file = RangedFile(len(data), lambda start, stop, data=data: data[start:stop])
        said = header_info(file)
        if name in told:
            assert said == inspect(data) and said.frames == 10 * (22050 if name == "mono" else 44100), name
            assert file.fetched < len(data) or len(data) < 2 * BLOCK_BYTES, name
        else:
            assert said is None, name
    assert inspect(untold["cut"]).promised_frames == 441000  # (decoding it says it is cut short)
