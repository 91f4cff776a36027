"""Audio as numpy arrays: decode, splice, encode. Pure functions, no I/O beyond bytes.

Bit-exactness outside the region is a promise to users, so samples are kept in the
file's own integer type (int16 for 16-bit PCM, int32 for 24/32-bit) rather than floats:
the splice only ever converts the region itself, and everything else is copied.

A recording may be hours long (an archive's tape, a night of radio: 635 MB of samples an
hour in 16-bit stereo). A row's result is therefore not a second copy of it: `patch`
gives the recording with its new region as a view (`Patched`), which `encode` writes block
by block, and `read_back` checks what was written in one pass, keeping only the region
and its context. A row holds its encoded file and a block, not three copies of the audio.
"""

from __future__ import annotations

import functools
import io
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf

from soundpatch import metadata, soundio
from soundpatch.errors import RowError
from soundpatch.humanize import plural
from soundpatch.metadata import Carried
from soundpatch.mp3_length import LengthUnknown, given_length, whole_as_tagged

# How soundfile should hand each subtype over so that writing it back is lossless.
_NATIVE_DTYPE = {
    "PCM_S8": "int16",
    "PCM_U8": "int16",
    "PCM_16": "int16",
    "ULAW": "int16",
    "ALAW": "int16",
    "PCM_24": "int32",
    "PCM_32": "int32",
    "FLOAT": "float32",
    "DOUBLE": "float64",
}
# Codecs libsndfile decodes to 16-bit integers: read so, they are written back as 16-bit
# PCM, exactly (read as floats, they were written as 32-bit floats, twice the size).
_SIXTEEN_BIT_CODECS = {
    "IMA_ADPCM",
    "MS_ADPCM",
    "VOX_ADPCM",
    "NMS_ADPCM_16",
    "GSM610",
    "G721_32",
    "G723_24",
    "G723_40",
    "DWVW_12",
    "DWVW_16",
    "DPCM_8",
    "DPCM_16",
    "ALAC_16",
}
BLOCK_FRAMES = 1 << 18  # written and read back this many frames at a time (~1-2 MB a channel)
# Effective bits of integer subtypes, for rounding a float region back to the grid.
_BITS = {"PCM_S8": 8, "PCM_U8": 8, "PCM_16": 16, "ULAW": 16, "ALAW": 16, "PCM_24": 24, "PCM_32": 32}

# A file cut short (a copy or a transfer broken off, a recorder that lost power) keeps a
# header promising all of it. libsndfile reads a WAV or AIFF as far as its samples go and
# says so only in its log: "data : 529200 (should be 317502)", bytes promised and bytes there.
_DATA_CHUNK = re.compile(r"^\s*(data|SSND)\s*:\s*(\d+)\s*\(should be \d+\)", re.MULTILINE)
_BEFORE_SAMPLES = {"data": 0, "SSND": 8}  # bytes of the chunk before its samples (AIFF's offset and block size)
# Sony's Wave64 and the EBU's RF64 (WAVs over 4 GB, as broadcast and field recorders write
# them) are read as far as their samples go too, and their logs say what was promised, not
# "should be": W64's data chunk counts its own 24-byte header; RF64's size is in its ds64.
_PROMISED_BYTES = {
    "W64": (re.compile(r"^data\s*:\s*(\d+)\s*$", re.MULTILINE), 24),
    "RF64": (re.compile(r"^\s*Data size\s*:\s*(\d+)\s*$", re.MULTILINE), 0),
}
# What writers to a pipe put there, not knowing the length yet (libsndfile, ffmpeg; sox):
# such a file is not cut short, however little it holds.
_LENGTH_UNKNOWN = frozenset((0xFFFFFFFF, 0x7FFFFFFF, 0x7FFFF000))
_BYTES_PER_SAMPLE = {"PCM_S8": 1, "PCM_U8": 1, "ULAW": 1, "ALAW": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4}
_BYTES_PER_SAMPLE |= {"FLOAT": 4, "DOUBLE": 8}
# Formats whose header gives the length, checked by reading their last frame: a FLAC cut
# short cannot be read there, an MP3 cut short reads nothing there (an MP3 read by ranges is
# checked by its tag's byte count instead: its last frame is found by decoding all of it).
_LENGTH_IN_HEADER = frozenset(("FLAC", "MP3"))
# Formats whose header says what inspect() does, read without the rest of the file (and an
# MP3 whose tag says its length: mp3_length.whole_as_tagged).
_SAID_BY_HEADER = frozenset(("WAV", "WAVEX", "RF64", "W64", "AIFF", "FLAC", "CAF", "AU", "OGG"))
# A WAV whose recording was never finished (a recorder that lost power before writing its
# length) says it holds nothing, "data : 0", with its samples right after that.
_NOTHING_SAID = re.compile(r"^data\s*:\s*0\s*$", re.MULTILINE)
_HEAD_BYTES = 1 << 16  # where a WAV's chunks before its samples are looked for
# A decoder that stops this much short of its header's length (seconds) says the file is
# cut short; an MP3 without a frame count has only an estimate of its length.
SHORT_SECONDS = 0.1

OUTPUT_CONTAINERS = {"wav": "WAV", "flac": "FLAC", "mp3": "MP3", "ogg": "OGG"}
EXTENSIONS = {
    "WAV": "wav",
    "FLAC": "flac",
    "MP3": "mp3",
    "OGG": "ogg",
    "AIFF": "aiff",
    "W64": "w64",
    "RF64": "wav",
    "WAVEX": "wav",
    "CAF": "caf",
    "AU": "au",
}


@dataclass(frozen=True)
class AudioInfo:
    frames: int
    rate: int
    channels: int
    format: str
    subtype: str
    # What its header says it holds, where the file holds less (cut_short) or, 0, more (never_finished).
    promised_frames: int | None = None

    @property
    def duration(self) -> float:
        return self.frames / self.rate


@dataclass(frozen=True)
class Audio:
    """Samples shaped (frames, channels) in the file's native dtype, plus how it was stored."""

    samples: np.ndarray
    rate: int
    format: str
    subtype: str
    promised_frames: int | None = None  # as AudioInfo's
    carried: Carried | None = None  # what its file holds besides its audio, for its results

    @property
    def frames(self) -> int:
        return int(self.samples.shape[0])

    @property
    def channels(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration(self) -> float:
        return self.frames / self.rate

    @property
    def info(self) -> AudioInfo:
        return AudioInfo(self.frames, self.rate, self.channels, self.format, self.subtype, self.promised_frames)

    def float_slice(self, start: int, stop: int) -> np.ndarray:
        """Frames [start, stop) as float32 in [-1, 1), whatever the storage type."""
        return to_float(self.samples[max(0, start) : max(0, stop)])

    def blocks(self, size: int | None = None) -> Iterator[np.ndarray]:
        size = size or BLOCK_FRAMES
        for i in range(0, self.frames, size):
            yield self.samples[i : i + size]


@dataclass(frozen=True)
class Patched:
    """`original` with some of its frames replaced, without copying the rest: `regions`
    are (a, samples in the original's dtype for frames [a, a + len)), in order, apart."""

    original: Audio
    regions: Sequence[tuple[int, np.ndarray]]

    rate = property(lambda self: self.original.rate)
    format = property(lambda self: self.original.format)
    subtype = property(lambda self: self.original.subtype)
    frames = property(lambda self: self.original.frames)
    channels = property(lambda self: self.original.channels)
    info = property(lambda self: self.original.info)
    carried = property(lambda self: self.original.carried)

    def blocks(self, size: int | None = None) -> Iterator[np.ndarray]:
        size = size or BLOCK_FRAMES
        at = 0
        for a, samples in [*self.regions, (self.frames, self.original.samples[:0])]:
            for i in range(at, a, size):  # the original's own frames, as they are
                yield self.original.samples[i : min(a, i + size)]
            for i in range(0, len(samples), size):
                yield samples[i : i + size]
            at = a + len(samples)

    def cut(self, lo: int, hi: int) -> Patched:
        """Its frames [lo, hi) only (the regions must lie within them), still without a copy."""
        if not all(lo <= a and a + len(samples) <= hi for a, samples in self.regions):
            raise ValueError(f"frames [{lo}, {hi}) do not hold every region")
        original = self.original
        part = Audio(original.samples[lo:hi], original.rate, original.format, original.subtype)
        return Patched(part, [(a - lo, samples) for a, samples in self.regions])

    def audio(self) -> Audio:
        """As one array (a copy of the whole recording)."""
        samples = np.concatenate(list(self.blocks())) if self.frames else self.original.samples.copy()
        return Audio(samples, self.rate, self.format, self.subtype)


def to_float(samples: np.ndarray) -> np.ndarray:
    if samples.dtype == np.int16:
        return samples.astype(np.float32) / np.float32(2**15)
    if samples.dtype == np.int32:
        return (samples.astype(np.float64) / 2**31).astype(np.float32)
    return samples.astype(np.float32, copy=False)


def mono(x: np.ndarray) -> np.ndarray:
    """The average of the channels (frames, channels) -> (frames,), float.

    A matrix product: numpy's mean(axis=1) over a few columns is ~40x slower.
    """
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
    return x @ np.full(x.shape[1], 1.0 / x.shape[1], dtype)


def pcm16(values: np.ndarray) -> np.ndarray:
    """Float samples as 16-bit integers (the inverse of to_float), rounded and clipped;
    ~7x faster than leaving the conversion to libsndfile."""
    return np.clip(np.rint(values * np.float32(2**15)), -(2**15), 2**15 - 1).astype(np.int16)


def from_float(values: np.ndarray, like: Audio) -> np.ndarray:
    """Float samples back into `like`'s storage type, rounded to its bit depth and clipped."""
    dtype = like.samples.dtype
    if dtype == np.int16 or dtype == np.int32:
        bits = _BITS.get(like.subtype, 16 if dtype == np.int16 else 32)
        scale = float(2 ** (bits - 1))
        q = np.clip(np.round(values.astype(np.float64) * scale), -scale, scale - 1)
        shift = (16 if dtype == np.int16 else 32) - bits
        return (q * (2**shift)).astype(dtype)
    return values.astype(dtype)


def inspect(source: bytes | str, name: str = "audio") -> AudioInfo:
    """Read only the header (of bytes, or of a file by path): enough to check a region
    against the audio's length without decoding it. Bytes go through a BytesIO: a header
    is a few reads, and soundio would first copy the whole file. A FLAC or MP3 is also read
    at its last frame: one cut short is then decoded, to tell how much of it there is."""
    data = source if isinstance(source, bytes) else Path(source)
    try:
        with sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else source) as f:
            told = given_length(f, data)
            if told is None:
                info = _header_says(f)
                whole = f.format not in _LENGTH_IN_HEADER or f.frames <= 0 or _last_frame_read(f)
                offset = _unfinished_samples(f, data)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise _unreadable(name, exc) from None
    if told is not None:  # an MP3 that does not say its length, read through a copy that does
        return inspect(told, name)
    if offset is not None:  # what follows its header, whole frames of it
        size = len(data) if isinstance(data, bytes) else data.stat().st_size
        frames = (size - offset) // (_BYTES_PER_SAMPLE[info.subtype] * info.channels)
        info = AudioInfo(frames, info.rate, info.channels, info.format, info.subtype, promised_frames=0)
    if not whole:
        return decode(data, name).info
    if info.frames <= 0 or info.rate <= 0:
        raise RowError(f"{name} holds no audio samples")
    return info


def header_info(file: BinaryIO) -> AudioInfo | None:
    """What inspect() says of a file open for reading (a remote one read by ranges:
    ranged.py), where its header alone tells: None where only reading it all does
    (an MP3 whose tag does not say its length, or says more than it holds; a WAV never
    finished; a FLAC cut short) or it cannot be read (reading it all says why)."""
    try:
        with sf.SoundFile(file) as f:
            mp3 = f.format == "MP3" and f.subtype == "MPEG_LAYER_III"
            if (f.format not in _SAID_BY_HEADER and not mp3) or f.frames <= 0 or f.samplerate <= 0:
                return None
            info = _header_says(f)
            if f.format in _LENGTH_IN_HEADER and not (whole_as_tagged(file) if mp3 else _last_frame_read(f)):
                return None
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return None
    return info


def _header_says(f: sf.SoundFile) -> AudioInfo:
    """What the header of the file open in `f` says of it."""
    return AudioInfo(f.frames, f.samplerate, f.channels, f.format, f.subtype, _promised_frames(f))


def _last_frame_read(f: sf.SoundFile) -> bool:
    try:
        f.seek(f.frames - 1)
        return len(f.read(1)) == 1
    except (sf.LibsndfileError, RuntimeError):
        return False


def _promised_frames(f: sf.SoundFile, frames: int | None = None) -> int | None:
    """The frames the header of the file open in `f` promises, where it holds fewer of them
    (`frames`, if its decoder stopped short of f.frames): None if it holds them all."""
    width = _BYTES_PER_SAMPLE.get(f.subtype)
    if f.format in _PROMISED_BYTES:
        pattern, before = _PROMISED_BYTES[f.format]
        said = pattern.search(f.extra_info)
        if said is not None and width is not None and int(said[1]) not in _LENGTH_UNKNOWN:
            promised = (int(said[1]) - before) // (width * f.channels)
            return promised if promised > f.frames else None
    found = _DATA_CHUNK.search(f.extra_info)
    if found is not None and width is not None and int(found[2]) not in _LENGTH_UNKNOWN:
        promised = (int(found[2]) - _BEFORE_SAMPLES[found[1]]) // (width * f.channels)
        return promised if promised > f.frames else None
    if frames is not None and f.frames - frames >= SHORT_SECONDS * f.samplerate:
        return f.frames
    return None


def _unfinished_samples(f: sf.SoundFile, source: bytes | Path) -> int | None:
    """Where the samples start of a WAV, open in `f`, whose header was never finished: it
    says it holds none, yet some follow it. None for any other file."""
    if f.frames != 0 or f.format not in ("WAV", "WAVEX") or f.subtype not in _BYTES_PER_SAMPLE:
        return None
    if not _NOTHING_SAID.search(f.extra_info):
        return None
    if isinstance(source, bytes):
        head = source[:_HEAD_BYTES]
    else:
        with open(source, "rb") as file:
            head = file.read(_HEAD_BYTES)
    # "RIFF", its size, "WAVE"; then chunks: a name, a little-endian size, that many bytes
    for cid, body, _ in metadata.chunks(io.BytesIO(head), 12, len(head), "<"):
        if cid == b"data":
            return body
    return None


def cut_short(info: AudioInfo) -> str | None:
    """How much of what its header promises a file cut short holds ('3.600 s of the 6.000 s
    its header promises'), or None."""
    if not info.promised_frames:
        return None
    return f"{info.duration:.3f} s of the {info.promised_frames / info.rate:.3f} s its header promises"


def never_finished(info: AudioInfo) -> str | None:
    """What a WAV whose header was never finished holds ('it says it holds no samples; the
    6.000 s that follow it were read'), or None."""
    if info.promised_frames != 0:
        return None
    return f"it says it holds no samples; the {info.duration:.3f} s that follow it were read"


@dataclass(frozen=True)
class Stored:
    """A recording in a file, read a block at a time as it is written elsewhere, never
    whole: an earlier result published again in another format (`stored`)."""

    path: Path
    rate: int
    format: str
    subtype: str
    frames: int
    channels: int
    carried: Carried | None = None

    def blocks(self, size: int | None = None) -> Iterator[np.ndarray]:
        with soundio.open_audio(self.path) as f:
            dtype = _read_dtype(f.subtype)
            while len(block := f.read(size or BLOCK_FRAMES, dtype=dtype, always_2d=True)):
                yield block


def stored(path: Path, name: str = "audio") -> Stored:
    """The recording in the file at `path`, to be read as it is written (`Stored`)."""
    try:
        with soundio.open_audio(path) as f:
            found = Stored(path, f.samplerate, f.format, f.subtype, f.frames, f.channels, metadata.read(f, path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise _unreadable(name, exc) from None
    if found.frames == 0:
        raise RowError(f"{name} holds no audio samples")
    return found


def decode(data: bytes | Path, name: str = "audio") -> Audio:
    """Decode any format libsndfile reads (WAV, FLAC, OGG, MP3, AIFF, ...), from its bytes
    or from a file by path (then never held as bytes). A file cut short is decoded as far
    as it goes, and says how far (`promised_frames`); one that cannot be decoded past some
    point (a FLAC cut short or damaged) is refused, saying where: what follows may be lost.
    A WAV whose header was never finished (it says it holds nothing) is read to its end."""
    try:
        with soundio.open_audio(data) as f:
            offset = _unfinished_samples(f, data)
            rate, fmt, subtype = f.samplerate, f.format, f.subtype
            carried = metadata.read(f, data)
            if offset is None:
                samples = _samples(f, data, name)
                promised = _promised_frames(f, len(samples))
            else:
                with soundio.open_raw(data, offset, rate, f.channels, subtype) as raw:
                    samples, promised = _samples(raw, data, name), 0
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise _unreadable(name, exc) from None
    if len(samples) == 0:
        raise RowError(f"{name} holds no audio samples")
    return Audio(samples, rate, fmt, subtype, promised, carried)


def _samples(f: sf.SoundFile, data: bytes | Path, name: str) -> np.ndarray:
    """All the samples of the file open in `f` (read from `data`), as far as they go."""
    dtype = _read_dtype(f.subtype)
    samples = np.empty((max(f.frames, 0), f.channels), dtype)
    got, n = 0, 1
    while got < len(samples) and n:
        try:
            n = len(f.read(out=samples[got : got + BLOCK_FRAMES]))
            got += n
        except sf.LibsndfileError as exc:
            got = _decodable_frames(data, got, dtype)
            if got == 0:
                raise
            at = got / f.samplerate
            raise RowError(
                f"{name} cannot be decoded past {at:.3f} s of the {f.frames / f.samplerate:.3f} s its header "
                f"promises ({_reason(exc)}): it is cut short or damaged there"
            ) from None
    return samples[:got] if got == len(samples) else samples[:got].copy()  # not a copy of what is there


def _decodable_frames(data: bytes | Path, start: int, dtype: str) -> int:
    """How far a file that broke off after `start` frames decodes, to a FLAC frame or so."""
    got = start
    try:
        with soundio.open_audio(data) as f:
            f.seek(start)
            while len(block := f.read(4096, dtype=dtype, always_2d=True)):
                got += len(block)
    except (sf.LibsndfileError, RuntimeError):
        pass
    return got


def _unreadable(name: str, exc: Exception) -> RowError:
    """What a file that libsndfile cannot read (or not whole) is refused with."""
    if isinstance(exc, LengthUnknown):
        return RowError(f"{name} cannot be read whole: {exc}")
    return RowError(f"{name} is not audio that can be decoded ({_reason(exc)})")


def _reason(exc: Exception) -> str:
    """libsndfile's own words, without the file name it prefixes: 'Error opening x: ...'."""
    lines = str(exc).strip().splitlines()
    text = (lines[0].split(":")[-1].strip().rstrip(".") if lines else "") or type(exc).__name__
    return text[:1].lower() + text[1:]


def region_frames(start: float, end: float, rate: int, frames: int) -> tuple[int, int]:
    """Seconds to a frame range [a, b), rounded to the nearest sample, inside the audio."""
    a = min(max(0, round(start * rate)), frames)
    b = min(max(a, round(end * rate)), frames)
    return a, b


def damaged_frames(spans: Sequence[tuple[float, float]], rate: int, a: int, b: int) -> tuple[tuple[int, int], ...]:
    """A row's damaged spans (seconds) as frame ranges inside its region [a, b): each widened to
    the whole samples it touches (a sample half damaged is damaged), those that come to touch
    made one."""
    frames: list[tuple[int, int]] = []
    for start, end in spans:
        lo = min(max(a, math.floor(start * rate + 1e-6)), b)
        hi = min(max(lo, math.ceil(end * rate - 1e-6)), b)
        if hi <= lo:
            continue
        if frames and lo <= frames[-1][1]:
            frames[-1] = (frames[-1][0], max(frames[-1][1], hi))
        else:
            frames.append((lo, hi))
    return tuple(frames)


def equal_power_ramps(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(fade_out, fade_in) of length n with fade_out^2 + fade_in^2 == 1 at every sample.

    Sample k sits at (k + 0.5) / n so that neither end is exactly 0 or 1: the first and last
    samples of the region are already a blend, and the curve is symmetric.
    """
    theta = (np.arange(n, dtype=np.float64) + 0.5) / n * (np.pi / 2)
    return np.cos(theta).astype(np.float32)[:, None], np.sin(theta).astype(np.float32)[:, None]


def splice(original: Audio, fill: np.ndarray, a: int, b: int, crossfade: int) -> Audio:
    """`patch`, as one array."""
    return patch(original, fill, a, b, crossfade).audio()


def patch(original: Audio, fill: np.ndarray, a: int, b: int, crossfade: int) -> Patched:
    """Put `fill` (float32, (b - a, channels)) into frames [a, b) of `original`.

    Outside [a, b) the result is `original` bit for bit. Inside, equal-power crossfades of
    `crossfade` frames at each edge (capped at a quarter of the region) blend from the
    original into the fill and back, so a fill that does not meet the surroundings exactly
    still has no click at the seams.
    """
    if fill.ndim == 1:
        fill = fill[:, None]
    if fill.shape != (b - a, original.channels):
        raise ValueError(f"fill has shape {fill.shape}, expected {(b - a, original.channels)} for region [{a}, {b})")
    if b <= a:
        return Patched(original, ())
    region = np.array(fill, dtype=np.float32, copy=True)
    n = min(max(0, crossfade), (b - a) // 4)
    if n > 0:
        fade_out, fade_in = equal_power_ramps(n)
        head = original.float_slice(a, a + n)
        tail = original.float_slice(b - n, b)
        region[:n] = head * fade_out + region[:n] * fade_in
        region[-n:] = region[-n:] * fade_out + tail * fade_in
    return Patched(original, ((a, from_float(region, original)),))


def patch_spans(
    original: Audio, fill: np.ndarray, a: int, b: int, spans: Sequence[tuple[int, int]], crossfade: int
) -> Patched:
    """`fill` (float32, the region [a, b)'s) put into frames `spans` of the region alone (in
    order, apart), each as `patch` puts a region: every other frame, those between the spans
    too, is `original` bit for bit."""
    if fill.ndim == 1:
        fill = fill[:, None]
    if fill.shape != (b - a, original.channels):
        raise ValueError(f"fill has shape {fill.shape}, expected {(b - a, original.channels)} for region [{a}, {b})")
    pieces: list[tuple[int, np.ndarray]] = []
    for lo, hi in spans:
        if not a <= lo < hi <= b:
            raise ValueError(f"span [{lo}, {hi}) is not inside the region [{a}, {b})")
        pieces.extend(patch(original, fill[lo - a : hi - a], lo, hi, crossfade).regions)
    return Patched(original, tuple(pieces))


def _sample_dtype(audio: Audio | Patched | Stored) -> np.dtype:
    """The type its samples are (or will be, read from their file) in memory."""
    if isinstance(audio, Stored):
        return np.dtype(_read_dtype(audio.subtype))
    return (audio.original if isinstance(audio, Patched) else audio).samples.dtype


def output_subtype(audio: Audio | Patched | Stored, container: str) -> str:
    """Keep the input's subtype when the container can hold it; otherwise the closest lossless-ish one."""
    return _subtype_for(audio.subtype, _sample_dtype(audio), container)


def rounded_in(info: AudioInfo, container: str) -> str | None:
    """What a lossless `container` does to the samples of a recording shaped like `info`
    where it cannot hold them as they are ('32-bit float: rounded to 24 bits, and anything
    over full scale clipped'); None where it holds them, and for lossy containers (lossy
    by choice)."""
    if container in ("MP3", "OGG"):
        return None
    target = _subtype_for(info.subtype, np.dtype(_read_dtype(info.subtype)), container)
    held = _BITS.get(target)
    if held is None:  # a float subtype holds whatever comes
        return None
    if info.subtype in _FLOAT_VALUED:
        what = _FLOAT_VALUED[info.subtype]
        return f"{what}: rounded to {held} bits, and anything over full scale clipped"
    bits = _BITS.get(info.subtype) or _CODEC_BITS.get(info.subtype, 16)
    return f"{bits}-bit: rounded to {held} bits" if bits > held else None


# Subtypes whose samples are not on an integer grid (what each is, for a sentence) ...
_FLOAT_VALUED = {
    "FLOAT": "32-bit float",
    "DOUBLE": "64-bit float",
    "VORBIS": "Vorbis",
    "OPUS": "Opus",
    "MPEG_LAYER_I": "MPEG audio",
    "MPEG_LAYER_II": "MPEG audio",
    "MPEG_LAYER_III": "MP3",
}
# ... and of the codecs decoded as floats whose samples are on one, how fine it is (others: 16 bits).
_CODEC_BITS = {"ALAC_20": 20, "ALAC_24": 24, "ALAC_32": 32, "DWVW_24": 24, "DWVW_N": 32, "NMS_ADPCM_24": 24}


def decoded_bytes(info: AudioInfo) -> int:
    """What a recording shaped like `info` takes in memory, decoded (`decode`)."""
    return max(info.frames, 0) * info.channels * np.dtype(_read_dtype(info.subtype)).itemsize


def _read_dtype(subtype: str) -> str:
    """How soundfile should hand a subtype's samples over (see _NATIVE_DTYPE, _SIXTEEN_BIT_CODECS)."""
    return _NATIVE_DTYPE.get(subtype) or ("int16" if subtype in _SIXTEEN_BIT_CODECS else "float32")


def _subtype_for(subtype: str, dtype: np.dtype, container: str) -> str:
    """What to write samples of `subtype`, held as `dtype`, as in `container`: the subtype
    itself where it is PCM or float and the container holds it, or else what holds `dtype`'s
    values as they are (or as nearly as the container can)."""
    available = _subtypes(container)
    if container in ("MP3", "OGG"):
        if subtype in available:
            return subtype
    elif subtype in available and subtype in _NATIVE_DTYPE:
        # Only PCM and float carry over into a lossless container (libsndfile also
        # lists MP3-in-WAV, which it cannot write).
        return subtype
    sixteen = dtype.kind == "i" and dtype.itemsize == 2
    if container == "WAV":
        return "FLOAT" if dtype.kind == "f" else "PCM_16" if sixteen else "PCM_32"
    if container in ("FLAC", "AIFF"):
        return "PCM_16" if sixteen else "PCM_24"
    if container == "MP3":
        return "MPEG_LAYER_III"
    if container == "OGG":
        return "VORBIS"
    return sf.default_subtype(container)


def check_encodable(info: AudioInfo, container: str, remedy: str = "choose another output.format for it") -> None:
    """Raises RowError when `container` cannot hold audio shaped like `info` (MP3 holds at
    most two channels, at nine sample rates from 8 to 48 kHz; FLAC at most eight; AIFF
    under 4 GB...): found while validating, not after the row was paid for."""
    reason = _encoding_refused(container, info.subtype, info.channels, info.rate)
    size = info.frames * info.channels * _SAMPLE_BYTES.get(info.subtype, 4)
    if not reason and container in _SIZE_LIMITED and size > _SIZE_LIMITED[container]:
        reason = f"{size / 2**30:.1f} GB of samples, where one {container} file holds under 4 GB"
    if reason:
        raise RowError(
            f"the output format {container} cannot hold this recording ({plural(info.channels, 'channel')} at "
            f"{info.rate} Hz): {reason}; {remedy}"
        )


def encoded_bytes_bound(info: AudioInfo, container: str) -> int:
    """The most a recording shaped like `info` weighs encoded in `container`: its samples
    as written (FLAC's verbatim frames carry a little more), a lossy one at 512 kbit/s a
    pair of channels (above MP3's highest rate and Vorbis's at its best), and its headers."""
    headers = 1 << 16
    if container in ("MP3", "OGG"):
        return headers + math.ceil(info.duration * 64_000 * max(1.0, info.channels / 2))
    kept = info.subtype in _NATIVE_DTYPE and info.subtype in _subtypes(container)
    sample_bytes = _SAMPLE_BYTES.get(info.subtype, 4) if kept else 3 if container in ("FLAC", "AIFF") else 4
    samples = info.frames * info.channels * sample_bytes
    return headers + samples + samples // 64


@functools.lru_cache(maxsize=64)
def _subtypes(container: str) -> dict[str, str]:
    """What libsndfile writes in `container` (asked once: 0.2 ms a time, per row otherwise)."""
    return sf.available_subtypes(container)


_MAX_CHANNELS = {"MP3": 2, "FLAC": 8}
# Containers whose sizes are 32-bit (less their header); bytes a sample of each subtype takes.
_SIZED_32 = 2**32 - 2**20
_SIZE_LIMITED = {"AIFF": _SIZED_32}  # (a WAV past it is written as RF64: encode_file)
_SAMPLE_BYTES = {"PCM_S8": 1, "PCM_U8": 1, "ULAW": 1, "ALAW": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "DOUBLE": 8}


@functools.lru_cache(maxsize=256)
def _encoding_refused(container: str, subtype: str, channels: int, rate: int) -> str:
    """Why libsndfile would refuse it ("" if it would not), asked on a few frames of
    silence shaped like the recording."""
    most = _MAX_CHANNELS.get(container)
    if most is not None and channels > most:
        return f"it holds at most {most} channels"
    silence = np.zeros((64, channels), dtype=_read_dtype(subtype))
    try:
        encode(Audio(silence, rate, container, subtype), container)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        said = re.sub(r"^Error opening [^:]*:\s*(Error\s*:\s*)?", "", str(exc)).strip().rstrip(".")
        return said or "libsndfile cannot write it"
    return ""


def encode(audio: Audio | Patched, container: str) -> bytes:
    """Audio as a file in `container` (WAV, FLAC, MP3, OGG, ...) at its own rate and
    layout, written a block at a time."""
    blocks, subtype = _encodable(audio, container)
    return soundio.write_blocks(blocks, audio.rate, audio.channels, container, subtype)


def encode_file(audio: Audio | Patched | Stored, container: str, path: Path) -> None:
    """`encode`, into the file at `path`: a long recording is never held encoded in memory.
    What its file holds besides its audio goes with it (metadata.py)."""
    blocks, subtype = _encodable(audio, container)
    carried = audio.carried
    if isinstance(audio, Patched):  # a broadcast WAV's coding history says what was done
        spans = [(a / audio.rate, (a + len(samples)) / audio.rate) for a, samples in audio.regions]
        bits = _BITS.get(subtype) or (64 if subtype == "DOUBLE" else 32)
        carried = metadata.noting_edits(carried, spans, audio.rate, audio.channels, bits)
    tags = metadata.tags_for(carried, container)
    written = container
    if container == "WAV" and _wav_bytes(audio.frames, audio.channels, subtype, carried) > _SIZED_32:
        # A WAV's sizes are 32-bit: libsndfile writes one past 4 GB all the same, saying
        # 0xFFFFFFFF, and readers (libsndfile too) then stop at 4 GB. The EBU's RF64 is the
        # WAV of 64-bit sizes, read by libsndfile, ffmpeg, sox and audio editors alike.
        written = "RF64"
    soundio.write_file(path, blocks, audio.rate, audio.channels, written, subtype, tags)
    metadata.put_into(path, written, carried)


def _wav_bytes(frames: int, channels: int, subtype: str, carried: Carried | None) -> int:
    """What a WAV of these samples and chunks weighs, less its header."""
    return frames * channels * _SAMPLE_BYTES.get(subtype, 4) + metadata.chunks_bytes(carried)


def _encodable(audio: Audio | Patched | Stored, container: str) -> tuple[Iterator[np.ndarray], str]:
    """The blocks to write and the subtype to write them as."""
    subtype = output_subtype(audio, container)
    blocks = audio.blocks()
    if subtype in ("MPEG_LAYER_III", "VORBIS", "OPUS"):
        blocks = (to_float(block) for block in blocks)
    return blocks, subtype


@dataclass(frozen=True)
class ReadBack:
    """A written file as a user will read it, taken in one pass without holding it all."""

    frames: int
    excerpt: Audio  # its frames [lo, lo + excerpt.frames)
    lo: int
    outside_max_diff: float | None = None  # the largest difference from the original outside the region


def read_back(
    data: bytes | Path, lo: int, hi: int, name: str = "audio", against: tuple[Audio, int, int] | None = None
) -> ReadBack:
    """Decode `data` (bytes, or a file by path) block by block, keeping its frames [lo, hi);
    `against` (original, a, b): compared with `original` outside frames [a, b) on the way.
    Where the lengths differ (a lossy codec's padding), what overlaps is compared."""
    worst, kept, at = 0.0, [], 0
    try:
        with soundio.open_audio(data) as f:
            dtype = _read_dtype(f.subtype)
            rate, fmt, subtype, channels = f.samplerate, f.format, f.subtype, f.channels
            while True:
                block = f.read(BLOCK_FRAMES, dtype=dtype, always_2d=True)
                if not len(block):
                    break
                end = at + len(block)
                if lo < end and at < hi:
                    kept.append(block[max(lo, at) - at : min(hi, end) - at])
                if against is not None:
                    original, a, b = against
                    for x, y in ((at, min(a, end)), (max(b, at), min(end, original.frames))):
                        if x < y:
                            worst = max(worst, max_diff(original.samples[x:y], block[x - at : y - at]))
                at = end
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise _unreadable(name, exc) from None
    if at == 0:
        raise RowError(f"{name} holds no audio samples")
    excerpt = np.concatenate(kept) if kept else np.zeros((0, channels), dtype)
    return ReadBack(
        at, Audio(np.ascontiguousarray(excerpt), rate, fmt, subtype), lo, None if against is None else worst
    )


def max_diff(before: np.ndarray, after: np.ndarray) -> float:
    """The largest difference between two runs of samples, in full-scale units; exact
    comparison first (cheap)."""
    if before.dtype == after.dtype and np.array_equal(before, after):
        return 0.0
    return float(np.abs(to_float(after) - to_float(before)).max(initial=0.0))
