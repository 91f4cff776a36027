"""Where input audio comes from, read once per distinct source.

Bulk variation runs hit the same source hundreds of times; decoding it for every row
would cost more than the orchestration. Decoded sources are kept in a small cache
bounded by bytes, and concurrent rows for the same source wait for one decode.

Each source's SHA-256 is taken as it is read, with a stamp of the version read (a local
file's size and modification time, an S3 object's ETag, a web server's ETag or else its
Last-Modified time, with the length), so that a rerun can tell an unchanged source by its
stamp alone instead of reading it all again (`vouch`).

A source is never held as bytes (an hour of tape is 635 MB of them, beside as many of its
samples): a local file is hashed, then decoded, from its path (its stamp checked after
both, so that both were of one version); a remote one is spooled to a temporary file as it
arrives (hashed on the way; TMPDIR says where) and decoded from there.
"""

from __future__ import annotations

import glob as globbing
import hashlib
import re
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from soundpatch import web
from soundpatch.audio import (
    Audio,
    AudioInfo,
    cut_short,
    decode,
    decoded_bytes,
    header_info,
    inspect,
    never_finished,
)
from soundpatch.config import StorageConfig
from soundpatch.errors import RowError
from soundpatch.humanize import over_limit
from soundpatch.manifest import GLOB_CHARS
from soundpatch.memory_room import MemoryRoom
from soundpatch.metadata import file_time_reference, time_reference
from soundpatch.ranged import RangedFile
from soundpatch.s3 import S3, S3Uri

DEFAULT_CACHE_BYTES = 1 << 30
HEADERS_AT_ONCE = 16  # remote recordings' headers read at once (read_headers)
# What a folder given to `soundpatch detect` is searched for, by the files' names: the
# containers libsndfile reads. (A file that is not what its name says is reported unread.)
RECORDING_SUFFIXES = frozenset(
    (".wav", ".wave", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".aif", ".aiff", ".aifc", ".w64", ".rf64", ".caf")
)


def remote(uri: str) -> bool:
    """Whether an input is read from a bucket or a web server (else, from a local path)."""
    return uri.startswith(("s3://", "http://", "https://"))


class SourceReader:
    def __init__(
        self,
        s3: S3 | None = None,
        storage: StorageConfig | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        room: MemoryRoom | None = None,
    ) -> None:
        """`room`: where a recording rows hold waits for room before it is decoded (memory_room.py)."""
        self._s3 = s3
        self._room = room
        self._storage = storage or StorageConfig()
        self._max_bytes = int(self._storage.max_input_mb * 1024 * 1024)
        self._cache: OrderedDict[str, Audio] = OrderedDict()
        self._alive: weakref.WeakValueDictionary[str, Audio] = weakref.WeakValueDictionary()  # decoded, still held
        self._cache_bytes = cache_bytes
        self._held = 0
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._info: dict[str, AudioInfo] = {}
        self._time_references: dict[str, int | None] = {}  # samples since midnight (time_stamp)
        self._unreadable: dict[str, RowError] = {}  # why read_headers could not read one
        self._checksums: dict[str, str] = {}
        self._stamps: dict[str, str | None] = {}

    def info(self, uri: str) -> AudioInfo:
        """Length, rate, channels and format from the header only (no full decode)."""
        cached = self._info.get(uri)
        if cached is not None:
            return cached
        if remote(uri):
            with self._key_lock(uri):  # (rows of one recording ask at once: read once)
                if uri in self._unreadable:
                    raise self._unreadable[uri]
                info = self._info.get(uri) or self._remote_header(uri)  # its header by ranges (ranged.py)
            info = info or self.audio(uri).info  # else fetched and decoded once, and kept
        else:
            path = self._local_path(uri)
            info = inspect(str(path), f"input file {uri}")
        self._info[uri] = info
        return info

    def read_headers(self, uris: Iterable[str]) -> None:
        """The headers of remote recordings, read by ranges several at once (an archive's
        hundreds of tapes, each a HEAD and a range or two away), for info() and time_stamp()
        to answer from. One whose header does not tell is downloaded only when asked."""
        todo = sorted({uri for uri in uris if remote(uri) and uri not in self._info})

        def read(uri: str) -> None:
            with self._key_lock(uri):
                try:
                    info = self._info.get(uri) or self._remote_header(uri)
                except RowError as exc:  # (an untrusted certificate): said when asked, not asked again
                    self._unreadable[uri] = exc
                    return
                if info is not None:
                    self._info[uri] = info

        if todo:
            with ThreadPoolExecutor(max_workers=min(HEADERS_AT_ONCE, len(todo))) as pool:
                list(pool.map(read, todo))

    def _remote_header(self, uri: str) -> AudioInfo | None:
        """What the header of a remote recording says, and its time stamp, read by ranges
        (ranged.py): None where that does not tell, or the server cannot say (the download
        then does, or says why not)."""
        with self._byte_ranges(uri) as ranges:
            if ranges is None or not 0 < ranges[0] <= self._max_bytes:
                return None
            file = RangedFile(*ranges)
            file.fetch_head()
            info = header_info(file)
            samples = file_time_reference(file) if info is not None else None
        if info is None or file.failure is not None:
            return None
        self._time_references[uri] = samples
        return info

    @contextmanager
    def _byte_ranges(self, uri: str) -> Iterator[tuple[int, Callable[[int, int], bytes]] | None]:
        """The length of a remote recording, and a fetch of its byte ranges of that version."""
        if not uri.startswith("s3://"):
            with web.byte_ranges(uri, self._storage.http) as ranges:
                yield ranges
            return
        target = S3Uri.parse(uri)
        try:
            head = self._s3.head(target) if self._s3 is not None else None
        except RowError:
            head = None
        if not head or not head.get("ETag"):
            yield None
            return
        yield (
            int(head.get("ContentLength") or 0),
            lambda start, stop: self._s3.read_range(target, start, stop, head["ETag"]),
        )

    def time_stamp(self, uri: str) -> tuple[float | None, float]:
        """When the recording's first sample was recorded, in seconds since midnight (its
        bext time reference, or its iXML's: metadata.time_reference), None where its file
        does not say; and how long it is."""
        info = self.info(uri)
        if uri not in self._time_references:  # (asked once for each of its rows)
            if remote(uri):
                samples = time_reference(self.audio(uri).carried)  # (downloaded for its info already)
            else:
                try:
                    samples = file_time_reference(self._local_path(uri))
                except OSError as exc:  # (its header was read a moment ago)
                    raise RowError(f"input file {uri} cannot be read ({exc.strerror})") from None
            self._time_references[uri] = samples
        samples = self._time_references[uri]
        return (None if samples is None else samples / info.rate), info.duration

    def audio(self, uri: str) -> Audio:
        with self._lock:
            hit = self._known(uri)
            if hit is not None:
                return hit
        with self._key_lock(uri):
            with self._lock:
                hit = self._known(uri)
                if hit is not None:
                    return hit
            self._stamp_before_reading(uri)
            if remote(uri):
                audio, checksum = self._download(uri)
            else:  # by its path: an hour-long recording is never held as bytes beside its samples
                path = self._local_path(uri)
                checksum = file_sha256(path)
                self._make_room(uri, self.info(uri))
                audio = decode(path, f"input file {uri}")
                if self._current_stamp(uri) != self.stamp(uri):  # read twice: the same version both times
                    raise RowError(f"input file {uri} changed while it was being read; run again once it is written")
            self._info[uri] = audio.info  # what it holds, where its header says otherwise (audio.cut_short)
            with self._lock:
                self._checksums[uri] = checksum
                self._cache[uri] = audio
                self._alive[uri] = audio
                self._held += audio.samples.nbytes
                while self._held > self._cache_bytes and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._held -= old.samples.nbytes
            return audio

    def _key_lock(self, uri: str) -> threading.Lock:
        """What rows reading `uri` take turns by, so that it is read once."""
        with self._lock:
            return self._key_locks.setdefault(uri, threading.Lock())

    def _known(self, uri: str) -> Audio | None:
        """`uri` decoded already: in the cache, or no longer there but still held by a row
        (decoding it again would hold it twice). A row holding it now counts it in the room."""
        hit = self._cache.get(uri)
        if hit is not None:
            self._cache.move_to_end(uri)
        else:
            hit = self._alive.get(uri)
        if hit is not None and self._room is not None:
            self._room.admit(uri, hit.samples.nbytes, wait=False)  # held by this row now: counted
        return hit

    def infos(self) -> list[tuple[str, AudioInfo]]:
        """(the input as messages show it, what it holds) of each source read so far."""
        return [(web.shown_input(uri), info) for uri, info in list(self._info.items())]

    def header_notes(self) -> list[str]:
        """What to say of the sources read so far that hold other than their headers say."""
        infos = list(self._info.items())
        unfinished = [web.shown_input(uri) for uri, info in infos if never_finished(info) is not None]
        notes = self._cut_short_notes([(uri, info) for uri, info in infos if cut_short(info) is not None])
        if len(unfinished) == 1:
            notes.append(
                f"Input {unfinished[0]} was never finished: its header says it holds no samples (a recorder that "
                "stopped before writing its length), and what follows it was read; its rows' results are flagged."
            )
        elif unfinished:
            notes.append(
                f"{len(unfinished)} inputs were never finished ({', '.join(unfinished[:3])}"
                f"{', ...' if len(unfinished) > 3 else ''}): their headers say they hold no samples (a recorder "
                "that stopped before writing the length), and what follows each was read; their rows' results "
                "are flagged."
            )
        return notes

    @staticmethod
    def _cut_short_notes(short: list[tuple[str, AudioInfo]]) -> list[str]:
        if not short:
            return []
        if len(short) == 1:
            uri, info = short[0]
            return [
                f"Input {web.shown_input(uri)} is cut short: it holds {cut_short(info)}; rows within what it holds "
                "are done on it and flagged, rows past its end are invalid."
            ]
        listed = "; ".join(
            f"{web.shown_input(uri)}: {info.duration:.3f} s of the {(info.promised_frames or 0) / info.rate:.3f} s"
            for uri, info in short[:3]
        )
        return [
            f"{len(short)} inputs are cut short, holding less than their headers promise ({listed}"
            f"{'; ...' if len(short) > 3 else ''}): rows within what they hold are done on it and flagged, rows "
            "past their end are invalid."
        ]

    def checksum(self, uri: str) -> str:
        """SHA-256 of the source's bytes, taken when it was read for decoding."""
        with self._lock:
            known = self._checksums.get(uri)
        if known is None and not remote(uri):
            self._stamp_before_reading(uri)
            known = file_sha256(self._local_path(uri))
            with self._lock:
                self._checksums[uri] = known
        if known is None:
            self.audio(uri)
            with self._lock:
                known = self._checksums[uri]
        return known

    def known_checksum(self, uri: str) -> str | None:
        """checksum() where it is known without reading `uri` (read already, or vouched for)."""
        with self._lock:
            return self._checksums.get(uri)

    def stamp(self, uri: str) -> str | None:
        """The stamp of the version whose checksum was taken (None: no stamp to be had)."""
        with self._lock:
            return self._stamps.get(uri)

    def vouch(self, uri: str, stamp: str | None, sha256: str) -> None:
        """An earlier reading of `uri` (its stamp and checksum): taken as this run's if the
        source still bears that stamp, so its checksum is known without reading it."""
        with self._lock:
            if stamp is None or uri in self._checksums:
                return
        try:
            now = self._current_stamp(uri)
        except (OSError, RowError):
            return
        if now == stamp:
            with self._lock:
                self._checksums.setdefault(uri, sha256)
                self._stamps.setdefault(uri, stamp)

    def _stamp_before_reading(self, uri: str) -> None:
        if uri.startswith(("http://", "https://")):
            return  # its stamp comes with the download itself (_read)
        try:
            stamp = self._current_stamp(uri)
        except (OSError, RowError):
            stamp = None  # reading it will say what is wrong
        with self._lock:
            self._stamps[uri] = stamp

    def _current_stamp(self, uri: str) -> str | None:
        if uri.startswith("s3://"):
            head = self._s3.head(S3Uri.parse(uri)) if self._s3 is not None else None
            return f"etag {head.get('ETag')} {head.get('ContentLength')}" if head and head.get("ETag") else None
        if uri.startswith(("http://", "https://")):
            return web.stamp(uri, self._storage.http)  # the server's ETag or Last-Modified, if it gives one
        st = self._local_path(uri).stat()
        return f"file {st.st_size} {st.st_mtime_ns}"

    def _download(self, uri: str) -> tuple[Audio, str]:
        """A remote source, decoded, and its checksum: spooled to a temporary file as it
        arrives (hashed on the way) and decoded from there, never held as bytes."""
        with tempfile.NamedTemporaryFile(prefix="soundpatch-input.") as spool:
            sink = _Hashing(spool)
            if uri.startswith("s3://"):
                if self._s3 is None:
                    raise RowError("s3:// inputs need S3 settings (storage.s3)")
                self._s3.read_into(S3Uri.parse(uri), self._max_bytes, sink)
                name = f"input {uri}"
            else:
                stamp = web.fetch_into(uri, self._storage.http, self._max_bytes, sink)
                with self._lock:
                    self._stamps[uri] = stamp  # the version these very bytes are
                name = f"input {web.shown(uri)}"
            if sink.size == 0:
                raise RowError(f"{name} is empty (0 bytes)")
            spool.flush()
            self._make_room(uri, inspect(spool.name, name))
            return decode(Path(spool.name), name), sink.digest.hexdigest()

    def _make_room(self, uri: str, info: AudioInfo) -> None:
        """Before `uri` is decoded: its turn for room in memory, when rows hold it
        (memory_room.py), and room in the cache, whose recordings no row may hold any more."""
        nbytes = decoded_bytes(info)
        cache_bytes = self._cache_bytes
        if self._room is not None:
            self._room.admit(uri, nbytes)
            cache_bytes = min(cache_bytes, self._room.limit_bytes - self._room.in_use)  # ... within the limit too
        with self._lock:
            while self._cache and self._held + nbytes > cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._held -= old.samples.nbytes

    def glob(self, pattern: str) -> list[str]:
        """The inputs a pattern names, sorted: local paths, or s3:// keys (`*` and `?` stay
        within one folder level, `**` crosses levels)."""
        if not pattern.startswith("s3://"):
            return sorted(p for p in globbing.glob(pattern, recursive=True) if Path(p).is_file())
        if self._s3 is None:
            raise RowError("s3:// inputs need S3 settings (storage.s3)")
        target = S3Uri.parse(pattern)
        fixed = GLOB_CHARS.split(target.key, 1)[0]
        regex = re.compile(_key_regex(target.key))
        keys = self._s3.keys(S3Uri(target.bucket, fixed))
        return [f"s3://{target.bucket}/{key}" for key in keys if regex.fullmatch(key) and not key.endswith("/")]

    @staticmethod
    def is_folder(given: str) -> bool:
        """A local folder, or an s3:// prefix written with its closing slash."""
        return given.endswith("/") if given.startswith("s3://") else Path(given).is_dir()

    def recordings_in(self, folder: str) -> list[str]:
        """The recordings (by name: RECORDING_SUFFIXES) in a folder or under an s3:// prefix,
        at every depth, sorted; not hidden ones (macOS's `._name.wav` copies are not audio)."""
        if folder.startswith("s3://"):  # (the prefix ends in "/")
            found = [(uri, uri[len(folder) :]) for uri in self.glob(folder.rstrip("/") + "/**")]
        else:  # (local patterns pass over hidden names themselves)
            found = [(path, str(Path(path).relative_to(folder))) for path in self.glob(str(Path(folder) / "**" / "*"))]
        return [
            uri
            for uri, inside in found
            if Path(inside).suffix.lower() in RECORDING_SUFFIXES
            and not any(part.startswith(".") for part in Path(inside).parts)
        ]

    def _local_path(self, uri: str) -> Path:
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
        if size > self._max_bytes:
            raise RowError(over_limit(f"input file {uri}", self._max_bytes, size))
        return path


class _Hashing:
    """A file written a chunk at a time, hashed on the way; emptied again by a retry."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.digest, self.size = file, hashlib.sha256(), 0

    def write(self, chunk: bytes) -> int:
        self.digest.update(chunk)
        self.size += len(chunk)
        return self.file.write(chunk)

    def seek(self, offset: int) -> int:
        return self.file.seek(offset)

    def truncate(self) -> int:
        self.digest, self.size = hashlib.sha256(), 0
        return self.file.truncate()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _key_regex(pattern: str) -> str:
    """A glob over S3 keys as a regular expression."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            close = pattern.find("]", i + 1)
            if close == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : close].replace("\\", "\\\\")
                out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
                i = close
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)
