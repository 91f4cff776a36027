"""Audio files held in memory, read and written by libsndfile without calling back into Python.

Given a BytesIO, libsndfile calls back into Python for every read, seek and tell of the
file, and every callback must take the GIL. A batch runs tens of row threads, and each
callback then waits its turn: with two other threads busy in Python, decoding a 6 s WAV
took 0.8 s instead of 0.08 s, and a 6 s FLAC 1.7 s instead of 0.09 s. Handed a file
descriptor instead, libsndfile does its own I/O with the GIL released. The descriptor
is an anonymous in-memory file (memfd on Linux; an unlinked temporary file elsewhere),
so nothing touches a disk or a name.
`python bench/audio_io.py` measures both ways with other threads busy.

A file on disk (a source given by its path, a result written to the run's scratch folder)
is opened by its path: libsndfile reads and writes it itself, and it never has to be held
in memory at all.
"""

from __future__ import annotations

import io
import os
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf

from soundpatch.mp3_length import given_length


@contextmanager
def _memory_file(data: bytes = b"") -> Iterator[int]:
    """A file descriptor of an anonymous file holding `data`, positioned at its start."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("soundpatch-audio", os.MFD_CLOEXEC)
    else:  # pragma: no cover - macOS, Windows
        fd = os.dup(tempfile.TemporaryFile().fileno())
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)  # libsndfile takes the current position as the file's start
        yield fd
    finally:
        os.close(fd)


def _contents(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _read_on(f: sf.SoundFile) -> sf.SoundFile:
    """`f`, read on from where each read ends. After every read soundfile seeks to where it
    ended; libsndfile's MP3 decoder takes that for a seek, and libmpg123 decodes again from
    a frame before it, without the bit reservoir of the frames before that: the two frames
    after each read came out wrong (0.06 off on a tone of 0.05). Told the file cannot seek,
    soundfile leaves it where it is (and a read is then always given its length)."""
    if f.format == "MP3":
        f._info.seekable = sf._snd.SF_FALSE
    return f


@contextmanager
def open_bytes(data: bytes) -> Iterator[sf.SoundFile]:
    """The audio file in `data`, open for reading (raises what soundfile raises). An MP3
    that does not say its length is read whole all the same (mp3_length)."""
    with _memory_file(data) as fd, sf.SoundFile(fd, closefd=False) as f:
        told = given_length(f, data)
        if told is None:
            yield _read_on(f)
            return
    with open_bytes(told) as f:  # (which says its length)
        yield f


@contextmanager
def open_audio(source: bytes | Path) -> Iterator[sf.SoundFile]:
    """The audio file in `source` (its bytes, or a file by path), open for reading."""
    if isinstance(source, Path):
        with sf.SoundFile(str(source)) as f:
            told = given_length(f, source)
            if told is None:
                yield _read_on(f)
                return
        with open_bytes(told) as f:
            yield f
    else:
        with open_bytes(source) as f:
            yield f


@contextmanager
def open_raw(source: bytes | Path, offset: int, rate: int, channels: int, subtype: str) -> Iterator[sf.SoundFile]:
    """The little-endian samples from byte `offset` on of the file in `source`, open for
    reading as headerless audio: a WAV whose header does not say how many there are."""
    raw = {"samplerate": rate, "channels": channels, "subtype": subtype, "endian": "LITTLE", "format": "RAW"}
    if isinstance(source, Path):  # (libsndfile does not read headerless audio from inside a file it opens)
        with open(source, "rb") as file, sf.SoundFile(_From(file, offset), **raw) as f:
            yield f
    else:
        with _memory_file(memoryview(source)[offset:]) as fd, sf.SoundFile(fd, closefd=False, **raw) as f:
            yield f


class _From:
    """A file read from byte `offset` on, as if that were its start: read by libsndfile
    through Python (a few large reads of a rare file: one whose header was never finished)."""

    def __init__(self, file: BinaryIO, offset: int) -> None:
        self._file, self._offset = file, offset
        file.seek(offset)

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(position + (self._offset if whence == os.SEEK_SET else 0), whence) - self._offset

    def tell(self) -> int:
        return self._file.tell() - self._offset

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)


def read(data: bytes, **kwargs: Any) -> tuple[np.ndarray, int]:
    """(samples, rate) of the audio file in `data`; keyword arguments as for SoundFile.read."""
    with open_bytes(data) as f:
        return f.read(**{"frames": f.frames, **kwargs}), f.samplerate


def write(samples: np.ndarray, rate: int, format: str, subtype: str | None = None) -> bytes:
    """`samples` as the bytes of an audio file (format and subtype as soundfile names them)."""
    if samples.ndim == 1:
        samples = samples[:, None]
    return write_blocks((samples,), rate, samples.shape[1], format, subtype)


def write_blocks(
    blocks: Iterable[np.ndarray], rate: int, channels: int, format: str, subtype: str | None = None
) -> bytes:
    """The bytes of an audio file written from `blocks` of frames (frames, channels), in order."""
    if format == "WAV":  # a header and the samples in a few large writes: few callbacks, no copy
        buf = io.BytesIO()
        with sf.SoundFile(buf, "w", rate, channels, subtype, format=format) as f:
            for block in blocks:
                f.write(block)
        return buf.getvalue()
    with _memory_file() as fd:
        with sf.SoundFile(fd, "w", rate, channels, subtype, format=format, closefd=False) as f:
            for block in blocks:
                f.write(block)
        return _contents(fd)


def write_file(
    path: Path,
    blocks: Iterable[np.ndarray],
    rate: int,
    channels: int,
    format: str,
    subtype: str | None = None,
    tags: dict[str, str] | None = None,
) -> None:
    """An audio file at `path` written from `blocks` of frames (frames, channels), in order,
    with `tags` (title, artist... as soundfile names them) where the format holds them."""
    with sf.SoundFile(str(path), "w", rate, channels, subtype, format=format) as f:
        for name, value in (tags or {}).items():
            if format == "MP3":  # its ID3 frames say Latin-1 and get the UTF-8 bytes: 'CafÃ©'
                value = _ascii_folded(value)
            try:
                if value:
                    setattr(f, name, value)
            except (sf.LibsndfileError, RuntimeError):
                pass  # a tag this format does not hold
        for block in blocks:
            f.write(block)


def _ascii_folded(text: str) -> str:
    """`text` in ASCII, accents taken off ('Café' -> 'Cafe'); what has no ASCII form left out."""
    decomposed = unicodedata.normalize("NFKD", text)
    return decomposed.encode("ascii", "ignore").decode().strip()
