"""A remote recording read by byte ranges, for what its header says.

`soundpatch validate`, `run --dry-run` and a run's opening checks need of a recording only
what its header says: its length, rate, channels and format, where it is cut short, and a
broadcast WAV's time stamp. For an archive of hour-long tapes in a bucket, downloading each
whole for that (600 MB a tape, and again for its rows) costs hours and the bucket's egress.

A `RangedFile` is a remote object as a file whose bytes are fetched a block at a time as
they are read (libsndfile seeks to what it needs: a WAV's chunks, a FLAC's last frame): at
most `budget` bytes in all, every block of the one version first looked up (S3's If-Match,
HTTP's If-Range: sources.SourceReader._byte_ranges). libsndfile reads it through callbacks, where an exception
cannot pass: a failed or refused fetch reads as the end of the file and is kept in
`failure`, and whoever reads the header then downloads the recording whole instead.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable

BLOCK_BYTES = 1 << 16
HEADER_BUDGET_BYTES = 4 << 20  # past this, a recording is downloaded whole for its header


class OverBudget(Exception):
    """Reading the header needs more of the file than a header read is allowed."""


class RangedFile(io.RawIOBase):
    def __init__(
        self,
        size: int,
        fetch: Callable[[int, int], bytes],
        budget: int = HEADER_BUDGET_BYTES,
        block: int = BLOCK_BYTES,
    ) -> None:
        """`fetch(start, stop)`: bytes start..stop-1 of the object, all of them."""
        super().__init__()
        self.size = size
        self._fetch = fetch
        self._budget = budget
        self._block = block
        self._blocks: dict[int, bytes] = {}
        self._at = 0
        self.fetched = 0  # bytes fetched so far
        self.failure: Exception | None = None

    def fetch_head(self) -> None:
        """Its first block, fetched now, before libsndfile reads it: reads through its Python
        callbacks were seen to go one file at a time in a process, so headers read at once
        waited for each other's round trips there (a WAV's needs no more than this block)."""
        self._block_at(0)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._at

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._at, os.SEEK_END: self.size}[whence]
        self._at = max(0, base + offset)
        return self._at

    def readinto(self, buffer) -> int:  # noqa: ANN001 - any writable buffer
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._at < self.size:
            index, within = divmod(self._at, self._block)
            data = self._block_at(index)
            if data is None:
                break
            part = data[within : within + len(view) - done]
            if not part:
                break
            view[done : done + len(part)] = part
            done += len(part)
            self._at += len(part)
        return done

    def _block_at(self, index: int) -> bytes | None:
        """The block, fetched if need be; None once a fetch failed (`failure` says why)."""
        if index in self._blocks:
            return self._blocks[index]
        if self.failure is not None:
            return None
        start = index * self._block
        stop = min(self.size, start + self._block)
        try:
            if self.fetched + stop - start > self._budget:
                raise OverBudget(f"its header needs more than {self._budget} bytes read")
            data = self._fetch(start, stop)
            self.fetched += len(data)
            if len(data) != stop - start:
                raise OSError(f"asked for {stop - start} bytes at {start}, got {len(data)}")
        except Exception as exc:  # noqa: BLE001 - told through `failure`: libsndfile's callbacks cannot raise
            self.failure = exc
            return None
        self._blocks[index] = data
        return data
