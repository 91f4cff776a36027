"""What a recording's file holds besides its audio, carried into its result.

An archive's files say where they come from: a broadcast WAV's `bext` chunk (its
description, originator, and the time reference that syncs it with picture), a field
recorder's `iXML` (scene, take, track names), cue points and their labels, loop points, a
FLAC's tags and cover art. A result that is the same recording with one region redone
keeps all of that, as it keeps the audio outside the region:

- into the same kind of file (a WAV family input into a WAV, an AIFF into an AIFF, a FLAC
  into a FLAC), the file's own chunks or metadata blocks are written into the result as
  they are, byte for byte, except those that describe the audio's bytes rather than the
  recording (sizes, format, checksums such as `md5 `, peak levels, padding, a FLAC's
  seek table): libsndfile writes those anew for the result;
- into another kind (a FLAC into a WAV, a WAV into an MP3...), the tags libsndfile knows
  in both (title, artist, album, date, comment, copyright, ...) are written as the
  result's own.

The result holds as many samples as its recording, so cue points, loop points and the
time reference still point where they did. A row's own result beside a file of several
rows' edits (`<name>.rows/`) is an excerpt and carries nothing: its sample positions are
not the recording's.
"""

from __future__ import annotations

import errno
import io
import itertools
import logging
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import soundfile as sf

MAX_CARRIED_BYTES = 16 << 20  # of chunks or blocks from one file; what is past it is left out
MAX_CARRIED_PARTS = 1024  # chunks or blocks (a file of a million empty chunks is not copied into each result)
# Chunks that describe the audio's bytes, not the recording: libsndfile writes its own, or
# they would be wrong for the result (a checksum of the samples, a peak envelope, padding).
_RIFF_OWN = {b"fmt ", b"data", b"fact", b"PEAK", b"ds64", b"JUNK", b"junk", b"PAD ", b"FLLR", b"md5 ", b"levl", b"r64m"}
_AIFF_OWN = {b"COMM", b"SSND", b"FVER", b"PEAK"}
# FLAC metadata blocks carried: APPLICATION, VORBIS_COMMENT, CUESHEET, PICTURE (not
# STREAMINFO, PADDING or SEEKTABLE, whose contents are the result's own).
_FLAC_CARRIED = {2, 4, 5, 6}
_FLAC_VORBIS_COMMENT = 4
_BEXT_FIXED = 602  # bytes of a bext chunk before its coding history (EBU Tech 3285)
_FAMILY = {"WAV": "RIFF", "WAVEX": "RIFF", "RF64": "RIFF", "AIFF": "AIFF", "FLAC": "FLAC"}
log = logging.getLogger("soundpatch")


@dataclass(frozen=True)
class Carried:
    """A file's metadata: `parts`, its chunks or FLAC blocks as they are ((id, body): a
    chunk's four-byte id, or a FLAC block's type as one byte), for a result of the same
    `family` ("RIFF", "AIFF", "FLAC"); `tags`, the ones libsndfile reads, for any other."""

    family: str
    parts: tuple[tuple[bytes, bytes], ...] = ()
    tags: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.parts or self.tags)


def read(f: sf.SoundFile, source: bytes | Path) -> Carried | None:
    """The metadata of the file open in `f` (whose bytes, or path, are `source`), or None
    when it has none to carry."""
    family = _FAMILY.get(f.format, "")
    try:
        tags = tuple(sorted(f.copy_metadata().items()))
    except (sf.LibsndfileError, RuntimeError):
        tags = ()
    parts: tuple[tuple[bytes, bytes], ...] = ()
    if family:
        with _opened(source) as raw:
            try:
                parts = tuple(itertools.islice(_carried_parts(raw, family), MAX_CARRIED_PARTS))
            except (OSError, struct.error, ValueError):
                parts = ()  # a header it cannot follow: libsndfile read the audio anyway
    carried = Carried(family, parts, tags)
    return carried or None


def noting_edits(
    carried: Carried | None, spans: list[tuple[float, float]], rate: int, channels: int, bits: int
) -> Carried | None:
    """`carried` with a line added to a broadcast WAV's coding history (the end of its `bext`
    chunk) saying what was done to it, as EBU R 98 asks of each process that changes the
    audio: `A=PCM,F=48000,W=24,M=stereo,T=soundpatch inpaint 12.500-15.000 s`. `spans`: the
    seconds replaced. Other files, and a result of no edit, are given nothing."""
    if carried is None or not spans or not any(cid == b"bext" for cid, _ in carried.parts):
        return carried
    shown = "; ".join(f"{a:.3f}-{b:.3f} s" for a, b in spans[:5])
    more = f" (and {len(spans) - 5} more)" if len(spans) > 5 else ""
    mode = {1: "mono", 2: "stereo"}.get(channels)
    line = f"A=PCM,F={rate},W={bits},{f'M={mode},' if mode else ''}T=soundpatch inpaint {shown}{more}\r\n"
    parts = []
    for cid, body in carried.parts:
        if cid == b"bext" and len(body) >= _BEXT_FIXED:
            history = body[_BEXT_FIXED:].rstrip(b"\0")
            if history and not history.endswith(b"\n"):
                history += b"\r\n"
            body = body[:_BEXT_FIXED] + history + line.encode("ascii")
        parts.append((cid, body))
    return replace(carried, parts=tuple(parts))


def tags_for(carried: Carried | None, container: str) -> dict[str, str]:
    """The tags to give a result in `container`: none where its parts are carried whole."""
    if carried is None or (carried.parts and _FAMILY.get(container) == carried.family):
        return {}
    return dict(carried.tags)


def put_into(path: Path, container: str, carried: Carried | None) -> None:
    """Write `carried`'s parts into the result libsndfile wrote at `path` in `container`,
    when it is of their family."""
    if carried is None or not carried.parts or _FAMILY.get(container) != carried.family:
        return
    if carried.family == "FLAC":
        _put_flac_blocks(path, carried.parts)
    else:
        _append_chunks(path, carried.parts, *_CHUNKED[carried.family])


# ---------------------------------------------------------------------------- reading


@contextmanager
def _opened(source: bytes | Path) -> Iterator[BinaryIO]:
    if isinstance(source, bytes):
        yield io.BytesIO(source)
    else:
        with open(source, "rb") as f:
            yield f


def _size_of(f: BinaryIO) -> int:
    at = f.tell()
    size = f.seek(0, os.SEEK_END)
    f.seek(at)
    return size


def chunks(f: BinaryIO, start: int, end: int, endian: str) -> Iterator[tuple[bytes, int, int]]:
    """(id, where its body begins, its size) of each chunk of a RIFF or AIFF file (`endian`
    "<" or ">") from `start` to `end`, stopping at one that runs past the file (audio cut
    short, or a header never finished)."""
    at = start
    while at + 8 <= end:
        f.seek(at)
        cid, size = struct.unpack(f"{endian}4sI", f.read(8))
        yield cid, at + 8, size
        if at + 8 + size > end:
            return
        at += 8 + size + (size & 1)


def _riff_chunks(f: BinaryIO, end: int) -> Iterator[tuple[bytes, int, int]]:
    """The chunks of a WAV, RF64 or BW64 before its audio and after it."""
    kind, _, form = struct.unpack("<4sI4s", f.read(12))
    if kind not in (b"RIFF", b"RF64", b"BW64") or form != b"WAVE":
        return
    data_size = None  # an RF64's, from its ds64 chunk
    for cid, body, size in chunks(f, 12, end, "<"):
        if cid == b"ds64" and size >= 16:
            f.seek(body + 8)
            data_size = struct.unpack("<Q", f.read(8))[0]
        if cid == b"data":
            if size == 0xFFFFFFFF and data_size is not None:
                size = data_size
            elif size in (0, 0xFFFFFFFF):
                return  # an unfinished header's data runs to the end
            yield from chunks(f, body + size + (size & 1), end, "<")  # a LIST INFO is often there
            return
        yield cid, body, size


def _aiff_chunks(f: BinaryIO, end: int) -> Iterator[tuple[bytes, int, int]]:
    kind, _, form = struct.unpack(">4sI4s", f.read(12))
    if kind == b"FORM" and form in (b"AIFF", b"AIFC"):
        yield from chunks(f, 12, end, ">")


def _flac_blocks(f: BinaryIO) -> Iterator[tuple[int, int, int, bool]]:
    """(type, where its body begins, its size, whether it is the last) of each metadata
    block of the FLAC stream in `f` (after an ID3 tag some writers put first)."""
    end = _size_of(f)
    at = 0
    head = f.read(10)
    if head[:3] == b"ID3" and len(head) == 10:
        at = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(head[6:10]))
        f.seek(at)
        head = f.read(4)
    if head[:4] != b"fLaC":
        return
    at += 4
    last = False
    while not last and at + 4 <= end:
        f.seek(at)
        flags, size = struct.unpack(">B3s", f.read(4))
        size = int.from_bytes(size, "big")
        last = bool(flags & 0x80)
        yield flags & 0x7F, at + 4, size, last
        at += 4 + size


def _flac_parts(f: BinaryIO, end: int) -> Iterator[tuple[bytes, int, int]]:
    for kind, body, size, _ in list(_flac_blocks(f)):
        yield bytes([kind]), body, size


# For each family: its parts (id, where the body begins, its size), and which are carried.
_PARTS = {
    "RIFF": (_riff_chunks, lambda cid: cid not in _RIFF_OWN),
    "AIFF": (_aiff_chunks, lambda cid: cid not in _AIFF_OWN),
    "FLAC": (_flac_parts, lambda cid: cid[0] in _FLAC_CARRIED),
}


def _carried_parts(f: BinaryIO, family: str) -> Iterator[tuple[bytes, bytes]]:
    """The parts of the file in `f` that are carried, read, within MAX_CARRIED_BYTES."""
    end = _size_of(f)
    walk, carried = _PARTS[family]
    budget = MAX_CARRIED_BYTES
    for cid, body, size in walk(f, end):
        if not carried(cid) or body + size > end:
            continue
        if size > budget:
            log.info("a %d-byte %r part is not carried into the result (over %d bytes)", size, cid, MAX_CARRIED_BYTES)
            continue
        f.seek(body)
        taken = f.read(size)
        if cid == b"LIST" and taken[:4] == b"wavl":  # a list of audio data, not of metadata
            continue
        budget -= size
        yield cid, taken


_BEXT_TIME_REFERENCE = 338  # where a bext chunk's TimeReference (samples since midnight, 64 bits) is
# An iXML's time stamp, as (high 32 bits, low 32 bits) of samples since midnight: its copy
# of the bext time reference, then its own (at TIMESTAMP_SAMPLE_RATE where that is given).
_IXML_STAMPS = (
    ("BWF_TIME_REFERENCE_HIGH", "BWF_TIME_REFERENCE_LOW"),
    ("TIMESTAMP_SAMPLES_SINCE_MIDNIGHT_HI", "TIMESTAMP_SAMPLES_SINCE_MIDNIGHT_LO"),
)


def time_reference(carried: Carried | None) -> int | None:
    """When a recording's first sample was recorded, in samples since midnight: a broadcast
    WAV's bext time reference, or the TIME_REFERENCE tag a FLAC made from one keeps it in
    (as ffmpeg and BWF MetaEdit write it), or else a field recorder's iXML time stamp. None
    where its file does not say."""
    said: dict[bytes, int | None] = {}
    for cid, body in carried.parts if carried is not None else ():
        if cid == b"bext" and len(body) >= _BEXT_TIME_REFERENCE + 8:
            said.setdefault(cid, struct.unpack_from("<Q", body, _BEXT_TIME_REFERENCE)[0])
        elif cid == bytes([_FLAC_VORBIS_COMMENT]):
            tag = _vorbis_comments(body).get("TIME_REFERENCE", "").strip()
            said.setdefault(cid, int(tag) if tag.isdigit() else None)
        elif cid == b"iXML":
            said.setdefault(cid, _ixml_time_stamp(body))
    for cid in (b"bext", bytes([_FLAC_VORBIS_COMMENT]), b"iXML"):  # the first that says, in this order
        if said.get(cid) is not None:
            return said[cid]
    return None


def _ixml_time_stamp(body: bytes) -> int | None:
    """An iXML chunk's time stamp, in samples since midnight at the file's sample rate
    (iXML 1.5: its SPEED's TIMESTAMP_SAMPLE_RATE may differ from FILE_SAMPLE_RATE, where
    the file was pulled up or down). Read field by field: recorders write XML loosely."""
    text = body.decode("utf-8", "replace")

    def number(name: str) -> int | None:
        found = re.search(rf"<{name}>\s*(\d+)\s*</{name}>", text)
        return int(found.group(1)) if found else None

    for high, low in _IXML_STAMPS:
        if (samples := number(low)) is not None:
            samples += (number(high) or 0) << 32
            at, rate = number("TIMESTAMP_SAMPLE_RATE"), number("FILE_SAMPLE_RATE")
            if low.startswith("TIMESTAMP") and at and rate and at != rate:
                samples = round(samples * rate / at)
            return samples
    return None


def file_time_reference(source: Path | BinaryIO) -> int | None:
    """time_reference() of the file at a path, or open (a remote one read by ranges:
    ranged.py), from its bext and iXML chunks or FLAC tags alone."""
    if isinstance(source, Path):
        with open(source, "rb") as f:
            return file_time_reference(f)
    f = source
    wanted = {b"bext", b"iXML", bytes([_FLAC_VORBIS_COMMENT])}
    f.seek(0)
    head = f.read(4)
    flac = head == b"fLaC" or head[:3] == b"ID3"
    family = "RIFF" if head in (b"RIFF", b"RF64", b"BW64") else "FLAC" if flac else ""
    if not family:
        return None
    f.seek(0)
    end = _size_of(f)
    parts = []
    try:
        for cid, body, size in _PARTS[family][0](f, end):
            if cid in wanted and body + size <= end and size <= MAX_CARRIED_BYTES:
                f.seek(body)
                parts.append((cid, f.read(size)))
    except (OSError, struct.error, ValueError):
        pass  # a header it cannot follow: what was found before it
    return time_reference(Carried(family, tuple(parts)))


def _vorbis_comments(body: bytes) -> dict[str, str]:
    """A FLAC's Vorbis comments (upper-case names; the first of a name repeated)."""
    found: dict[str, str] = {}
    try:
        at = 4 + struct.unpack_from("<I", body, 0)[0]  # past the vendor string
        (count,) = struct.unpack_from("<I", body, at)
        at += 4
        for _ in range(count):
            (size,) = struct.unpack_from("<I", body, at)
            name, _, value = body[at + 4 : at + 4 + size].decode("utf-8", "replace").partition("=")
            found.setdefault(name.upper(), value)
            at += 4 + size
    except struct.error:
        pass  # cut short: what came before
    return found


# ---------------------------------------------------------------------------- writing

_CHUNKED = {"RIFF": ("<", b"RIFF"), "AIFF": (">", b"FORM")}


def _chunk(cid: bytes, body: bytes, endian: str) -> bytes:
    return struct.pack(f"{endian}4sI", cid, len(body)) + body + (b"\0" if len(body) & 1 else b"")


def _append_chunks(path: Path, parts: tuple[tuple[bytes, bytes], ...], endian: str, kind: bytes) -> None:
    """The chunks go after the audio, where the file is written in place: the result of an
    hour-long recording is not copied for them (readers look for chunks throughout a file,
    and libsndfile itself puts its tags there when they come after the samples)."""
    added = b"".join(_chunk(cid, body, endian) for cid, body in parts)
    with path.open("r+b") as f:
        head = f.read(16)
        # An RF64's size is in its ds64 chunk, which libsndfile writes first (its header's
        # own says 0xFFFFFFFF: look there).
        rf64 = kind == b"RIFF" and head[:4] == b"RF64" and head[12:16] == b"ds64"
        if head[:4] != kind and not rf64:
            return
        end = f.seek(0, os.SEEK_END)
        pad = end & 1  # chunks begin on even bytes; an odd-sized audio chunk may lack its pad
        size = end + pad + len(added) - 8
        if size > 0xFFFFFFFF and not rf64:
            log.info("the metadata of %s is not carried: the result would be over 4 GB with it", path.name)
            return
        f.write(b"\0" * pad + added)
        f.seek(20 if rf64 else 4)
        f.write(struct.pack("<Q", size) if rf64 else struct.pack(f"{endian}I", size))


def chunks_bytes(carried: Carried | None) -> int:
    """What `carried`'s parts take as chunks appended to a WAV or AIFF."""
    if carried is None:
        return 0
    return sum(8 + len(body) + (len(body) & 1) for _, body in carried.parts)


def _put_flac_blocks(path: Path, parts: tuple[tuple[bytes, bytes], ...]) -> None:
    """A FLAC's metadata comes before its audio: the file is written again beside itself,
    with them, and put in its place (a FLAC result weighs half a WAV's, or less)."""
    with path.open("rb") as src:
        blocks = list(_flac_blocks(src))
        if not blocks or blocks[0][0] != 0:
            return
        carried_kinds = {cid[0] for cid, _ in parts}
        kept = []
        for kind, body, size, _ in blocks:
            # libsndfile's own comment block (its vendor string) gives way to the recording's:
            # a FLAC holds one at most. Padding is left out.
            if kind == 1 or (kind == _FLAC_VORBIS_COMMENT and kind in carried_kinds):
                continue
            src.seek(body)
            kept.append((kind, src.read(size)))
        kept += [(cid[0], body) for cid, body in parts]
        head = bytearray(b"fLaC")
        for i, (kind, body) in enumerate(kept):
            head += bytes([(0x80 if i == len(kept) - 1 else 0) | kind]) + len(body).to_bytes(3, "big") + body
        _, body, size, _ = blocks[-1]
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".carried.")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(head)
                src.seek(body + size)
                shutil.copyfileobj(src, out, 1 << 20)
            os.replace(tmp, path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # The result itself is whole and paid for: it goes on without them.
            log.warning(
                "the metadata of %s is not carried: its disk has no room to write it again with them", path.name
            )
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
