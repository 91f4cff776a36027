"""MP3s that do not say how long they are.

An MP3 says its length in an info tag in its first frame (Xing or Info, as LAME and most
encoders write it). Without one, libmpg123 estimates it from the file's size and its first
frame's bitrate, and libsndfile reads no further than that: an 8 s VBR file whose first
frame is dear reads as 2.5 s (the rest silently lost), one whose first frame is cheap
reads as longer than it is and looks cut short. Files without the tag are MP3s cut out
of a stream or a longer file, and what some encoders and recorders write.

Such a file is read through a copy given the tag: its frames are counted (header to
header), and two frames go before them, made here: one with the info tag, and a silent
one. The tag counts the silent frame and gives an encoder delay that trims exactly it and
the decoder's own delay (529 samples), so every sample comes where libmpg123 puts it
without the tag. Only Layer III is counted (what libmpg123's info tag is for).

A stream cut out of a longer one may start with frames whose data begins in the frames
cut off before them (the bit reservoir): libmpg123 would take it from the made frames,
and decode bursts of noise 50 times full scale. Such a file is read as libsndfile reads
it, unless that would lose more than 0.1 s of it: then it is refused, saying so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, NamedTuple

import soundfile as sf

# Bitrates (kbit/s) by the header's index: MPEG-1 Layer III, and MPEG-2 and 2.5 Layer III.
_KBPS = {
    True: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    False: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}  # by version bits
DECODER_DELAY = 529  # samples libmpg123 trims from the start of a file with an info tag
_HEAD_BYTES = 1 << 16  # read to find the first frame and its tag, after any ID3v2 tag
# A stream that must be cut short by this much (seconds) to be read as it is is refused.
_SHORT_SECONDS = 0.1
_TAGS_AFTER = 1 << 14  # bytes after the last frame that may be tags (ID3v1, APE, Lyrics3), not audio


class LengthUnknown(RuntimeError):
    """An MP3 whose length cannot be told to libsndfile; libsndfile would read a part of it."""


class _Frame(NamedTuple):
    version: int  # the header's bits: 3 MPEG-1, 2 MPEG-2, 0 MPEG-2.5
    rate_index: int
    mono: bool
    size: int  # bytes, header included
    samples: int  # per channel
    crc: bool  # two bytes of it after the header

    @property
    def side_info(self) -> int:
        """Bytes of side information after the header (and CRC), where an info tag starts."""
        if self.version == 3:
            return 17 if self.mono else 32
        return 9 if self.mono else 17

    def data_begins_before(self, data: bytes | memoryview, at: int) -> bool:
        """Whether the frame at `at` begins its data in frames before it (main_data_begin,
        the bit reservoir): a stream cut out of a longer one may start with such a frame."""
        side = at + 4 + 2 * self.crc
        return bool(data[side] or (self.version == 3 and data[side + 1] >> 7))


def _frame(data: bytes | memoryview, at: int) -> _Frame | None:
    """The Layer III frame whose header is at byte `at`, or None (not one, or free format)."""
    if at + 4 > len(data) or data[at] != 0xFF or data[at + 1] & 0xE0 != 0xE0:
        return None
    version, layer = (data[at + 1] >> 3) & 3, (data[at + 1] >> 1) & 3
    kbps, rate_index, padding = data[at + 2] >> 4, (data[at + 2] >> 2) & 3, (data[at + 2] >> 1) & 1
    if version == 1 or layer != 1 or kbps in (0, 15) or rate_index == 3:
        return None
    mpeg1 = version == 3
    rate = _RATES[version][rate_index]
    size = (144 if mpeg1 else 72) * _KBPS[mpeg1][kbps] * 1000 // rate + padding
    crc = not data[at + 1] & 0x01
    return _Frame(version, rate_index, data[at + 3] >> 6 == 3, size, 1152 if mpeg1 else 576, crc)


def _first_frame(data: bytes | memoryview) -> int:
    """Where the first frame starts: after an ID3v2 tag, if there is one."""
    if len(data) < 10 or bytes(data[:3]) != b"ID3":
        return 0
    size = (data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F)
    return 10 + size + (10 if data[5] & 0x10 else 0)  # (and its footer)


def _has_info_tag(data: bytes | memoryview, at: int, first: _Frame) -> bool:
    tag = at + 4 + first.side_info
    return bytes(data[tag : tag + 4]) in (b"Xing", b"Info") or bytes(data[at + 36 : at + 40]) == b"VBRI"


def whole_as_tagged(file: BinaryIO) -> bool:
    """Whether the MP3 open in `file` counts its frames and bytes in an info tag (Xing or
    Info, as LAME writes them) and holds all the bytes it counts: then its header tells its
    length as decoding it all would, and a remote one is known by a few ranges (ranged.py).
    A file cut short holds fewer bytes than its tag counts; one with no such tag says no
    more than an estimate. Reads the first frame only."""
    size = file.seek(0, os.SEEK_END)
    file.seek(0)
    at = _first_frame(file.read(10))
    file.seek(at)
    head = file.read(64)
    first = _frame(head, 0)
    if first is None:
        return False
    tag = 4 + first.side_info
    flags, frames, said = (int.from_bytes(head[tag + i : tag + i + 4], "big") for i in (4, 8, 12))
    counted = bytes(head[tag : tag + 4]) in (b"Xing", b"Info") and flags & 3 == 3  # frames and bytes
    return counted and frames > 0 and 0 < said <= size - at


def _frames(data: bytes | memoryview, at: int, first: _Frame) -> tuple[int, int]:
    """How many frames like `first` follow one another from byte `at` on, whole; and the
    byte after the last of them."""
    count = 0
    while (frame := _frame(data, at)) is not None and frame[:3] == first[:3] and at + frame.size <= len(data):
        count += 1
        at += frame.size
    return count, at


def _made_frames(data: bytes | memoryview, at: int, first: _Frame, frames: int) -> bytes:
    """The info tag's frame and the silent frame, for `frames` frames like `first` at `at`."""
    tag = bytearray(b"Xing" + (1).to_bytes(4, "big") + (frames + 1).to_bytes(4, "big"))  # flags: a frame count
    tag += b"LAME3.100" + bytes(27)  # the LAME tag, of which only its encoder delay is read:
    tag[12 + 21 : 12 + 24] = ((first.samples - DECODER_DELAY) << 12).to_bytes(3, "big")  # (and no padding)
    header = bytearray(data[at : at + 4])
    header[1] |= 0x01  # no CRC
    for kbps in range(1, 15):  # the smallest frame that holds the tag
        header[2] = (header[2] & 0x0D) | kbps << 4  # (no padding)
        made = _frame(header, 0)
        assert made is not None
        if made.size >= 4 + made.side_info + len(tag):
            break
    info = bytearray(made.size)
    info[:4] = header
    info[4 + made.side_info : 4 + made.side_info + len(tag)] = tag
    silent = bytearray(made.size)  # side information all zeros: no samples coded, silence
    silent[:4] = header
    return bytes(info + silent)


def given_length(f: sf.SoundFile, source: bytes | Path) -> bytes | None:
    """The MP3 open in `f` (read from `source`) as a copy with an info tag saying its length,
    where it has no tag and libmpg123's estimate is not its length; None otherwise (any other
    file, or one that is read whole as it is)."""
    if f.format != "MP3" or f.subtype != "MPEG_LAYER_III":
        return None
    if isinstance(source, Path):
        with open(source, "rb") as file:
            head = file.read(_HEAD_BYTES)
            at = _first_frame(head)
            if at + 64 > len(head):
                file.seek(at)
                head, at = file.read(64), 0
    else:
        head, at = source, _first_frame(source)
    first = _frame(head, at)
    if first is None or _has_info_tag(head, at, first):
        return None
    data = source.read_bytes() if isinstance(source, Path) else source
    at = _first_frame(data)
    frames, end = _frames(memoryview(data), at, first)
    if frames * first.samples == f.frames:
        return None
    if frames * first.samples < f.frames and len(data) - end > _TAGS_AFTER:
        return None  # (counted up to something that is not a frame, not to its end: what follows may be)
    if first.data_begins_before(data, at):
        # Cut out of a longer stream: its first frames take data from frames that are not
        # there, and libmpg123 would take it from the made ones (bursts 50 times full scale).
        lost = (frames * first.samples - f.frames) / f.samplerate
        if lost >= _SHORT_SECONDS:
            raise LengthUnknown(
                f"it is an MP3 cut out of a longer stream, with no tag saying its length: it holds "
                f"{frames * first.samples / f.samplerate:.3f} s and libsndfile reads {f.frames / f.samplerate:.3f} s "
                "of it (make it a WAV or FLAC, or an MP3 with its tag, to use it whole)"
            )
        return None
    return b"".join((data[:at], _made_frames(data, at, first, frames), data[at:]))
