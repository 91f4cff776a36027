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

from soundpatch.audio import Audio, AudioInfo, decode, inspect
from soundpatch.errors import RowError
from soundpatch.s3 import S3, S3Uri

DEFAULT_CACHE_BYTES = 1 << 30
MAX_INPUT_BYTES = 2 << 30  # what one remote input may weigh


class SourceReader:
    def __init__(self, s3: S3 | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self._s3 = s3
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
        if uri.startswith("s3://"):
            # A remote header costs a request anyway: fetch and decode once, keep it.
            info = self.audio(uri).info
        else:
            path = self._local_path(uri)
            info = inspect(str(path), path.name)
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
            data, name = self._read(uri)
            audio = decode(data, name)
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

    def _read(self, uri: str) -> tuple[bytes, str]:
        if uri.startswith("s3://"):
            if self._s3 is None:
                raise RowError("s3:// inputs need S3 settings (storage.s3)")
            target = S3Uri.parse(uri)
            data = self._s3.read(target, MAX_INPUT_BYTES)
            if not data:
                raise RowError(f"input {uri} is empty (0 bytes)")
            return data, target.key.rsplit("/", 1)[-1] or uri
        path = self._local_path(uri)
        return path.read_bytes(), path.name

    def _local_path(self, uri: str) -> Path:
        if uri.startswith(("http://", "https://")):
            scheme = uri.split("://", 1)[0]
            raise RowError(
                f"{scheme}:// inputs are not supported by this version of soundpatch yet; "
                "copy the file locally or to S3 and give its path"
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
