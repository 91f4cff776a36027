"""Where input audio comes from, read once per distinct source.

Bulk variation runs hit the same source hundreds of times; decoding it for every row
would cost more than the orchestration. Decoded sources are kept in a small cache
bounded by bytes, and concurrent rows for the same source wait for one decode.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path

import soundfile as sf

from soundpatch.audio import Audio, AudioInfo, decode
from soundpatch.errors import RowError

DEFAULT_CACHE_BYTES = 1 << 30


class SourceReader:
    def __init__(self, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self._cache: OrderedDict[str, Audio] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._held = 0
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._info: dict[str, AudioInfo] = {}
        self._checksums: dict[str, str] = {}

    def info(self, uri: str) -> AudioInfo:
        """Length, rate, channels and format from the header only (no full decode)."""
        cached = self._info.get(uri)
        if cached is not None:
            return cached
        path = self._local_path(uri)
        try:
            i = sf.info(str(path))
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise RowError(f"{path.name} is not audio that can be decoded ({_first_line(exc)})") from None
        if i.frames <= 0:
            raise RowError(f"{path.name} holds no audio samples")
        info = AudioInfo(i.frames, i.samplerate, i.channels, i.format, i.subtype)
        self._info[uri] = info
        return info

    def audio(self, uri: str) -> Audio:
        with self._lock:
            hit = self._cache.get(uri)
            if hit is not None:
                self._cache.move_to_end(uri)
                return hit
            key_lock = self._key_locks.setdefault(uri, threading.Lock())
        with key_lock:
            with self._lock:
                hit = self._cache.get(uri)
                if hit is not None:
                    return hit
            path = self._local_path(uri)
            data = path.read_bytes()
            audio = decode(data, path.name)
            with self._lock:
                self._checksums[uri] = hashlib.sha256(data).hexdigest()
                self._cache[uri] = audio
                self._held += audio.samples.nbytes
                while self._held > self._cache_bytes and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._held -= old.samples.nbytes
            return audio

    def checksum(self, uri: str) -> str:
        """SHA-256 of the source's bytes, taken when it was read for decoding."""
        with self._lock:
            known = self._checksums.get(uri)
        if known is None:
            self.audio(uri)
            with self._lock:
                known = self._checksums[uri]
        return known

    def _local_path(self, uri: str) -> Path:
        if uri.startswith(("s3://", "http://", "https://")):
            scheme = uri.split("://", 1)[0]
            raise RowError(
                f"{scheme}:// inputs are not supported by this version of soundpatch yet; "
                "copy the file locally and give its path"
            )
        path = Path(uri)
        if not path.exists():
            raise RowError(f"input file {uri} does not exist")
        if not path.is_file():
            raise RowError(f"input {uri} is not a file")
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise RowError(f"input file {uri} cannot be read ({exc.strerror})") from None
        if size == 0:
            raise RowError(f"input file {uri} is empty (0 bytes)")
        return path


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.split(":")[-1].strip() or text
    return text[:1].lower() + text[1:]
