"""Room on disk for a row's result, made sure of before the row pays for its prediction.

A result is written whole to the run's scratch folder before it is published (publish.py),
and copied again where the output folder is on another disk: an hour of 16-bit stereo is
635 MB, and rows of several such recordings are in flight at once. A disk that fills
while a result is written fails the row after its prediction was paid for (kept for the
next attempt, but still a row to run again). So before a row is sent, the room its result
will take is counted against the free space of each disk it will be written to, less what
rows already in flight were promised and a margin for the run's journal, kept answers and
report. A row that does not fit waits while rows in flight hold room on that disk (what
they give back may be enough), and is refused, before anything is spent and in one
sentence, when none do. Its room is looked at again as its create goes out (`Promise.gone`):
something else may have filled the disk while the row waited its turn.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from soundpatch.errors import RowError
from soundpatch.humanize import size as human_size

# Left free on each disk besides the results: the journal, kept answers, previews, report.
MARGIN_BYTES = 64_000_000
# Below this much free space, a write that failed is taken to have failed for want of room
# (libsndfile says only "System error." when the disk is full).
FULL_BYTES = 16_000_000
# Errors of a write that mean the disk (or the user's quota on it) is full.
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Failures that say what they are, and it is not room (a small read-only mount was "full").
NOT_ROOM_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG)


class DiskRoom:
    """Free space on the disks results are written to, shared out among rows in flight:
    the run's scratch folder (each result, and the paid answer it is made from), and the
    output folder when it is a local one on another disk (a result is linked into place
    from the scratch folder on the same disk, which takes no room, and copied onto another)."""

    def __init__(self, scratch: Path, outputs: Path | None, margin_bytes: int = MARGIN_BYTES) -> None:
        self.scratch = scratch
        self.outputs = outputs
        self.margin_bytes = margin_bytes
        self._changed = threading.Condition()
        self._promised: dict[int, int] = {}  # disk (st_dev) -> bytes promised to rows in flight
        self._holders: dict[int, int] = {}  # disk -> rows in flight holding room there

    def outputs_free(self) -> tuple[Path, int] | None:
        """The output folder, when it is a local one, and the free space on its disk now."""
        if self.outputs is None:
            return None
        return self.outputs, shutil.disk_usage(_existing(self.outputs)).free

    def for_result(self, result_bytes: int, answer_bytes: int = 0) -> Promise:
        """Room for one row's result of up to `result_bytes` (and its paid answer), to be
        made sure of with `Promise.make()` before the row pays."""
        return Promise(self, result_bytes, answer_bytes)

    def _take(
        self, result_bytes: int, answer_bytes: int, give_up: Callable[[], bool], waiting: Callable[[], None]
    ) -> list[tuple[int, Path, int]] | None:
        """(disk, a folder on it, bytes) promised on each disk, the scratch folder's first; None if `give_up()`
        turned true while waiting. Where a disk lacks the room, waits while other rows hold
        room there (they give it back as they end: a result uploaded from the scratch folder
        is removed from it); raises RowError when none do."""
        needs = self._needs(result_bytes, answer_bytes)
        told = False
        with self._changed:
            while (short := self._short_of(needs)) is not None:
                disk, lacking = short
                if not self._holders.get(disk):
                    raise RowError(
                        f"{lacking}; nothing was sent: free some space (or set runs_dir, or output.uri, to a larger "
                        "disk) and run it again"
                    )
                if give_up():
                    return None
                if not told:
                    waiting()
                    told = True
                self._changed.wait(timeout=1.0)  # other processes may free space too
            for disk, _, nbytes in needs:
                self._promised[disk] = self._promised.get(disk, 0) + nbytes
                self._holders[disk] = self._holders.get(disk, 0) + 1
        return needs

    def _gone(self, held: list[tuple[int, Path, int]]) -> str | None:
        """Why room promised (`held`) is no longer on its disk: the disk has less free than it
        and what the other rows in flight were promised there (the margin aside: the run's
        own files may have used it since). None while it is there."""
        with self._changed:
            for disk, folder, nbytes in held:
                free = shutil.disk_usage(_existing(folder)).free
                if nbytes and free - (self._promised.get(disk, 0) - nbytes) < nbytes:
                    return (
                        f"the disk holding {folder} filled up while this row waited its turn: its result takes up "
                        f"to {human_size(nbytes)} there, where {human_size(free)} is free; nothing was sent: free "
                        "some space and run it again"
                    )
        return None

    def lacks(self, result_bytes: int, answer_bytes: int = 0, what: str = "") -> str | None:
        """Why a result this large would not fit now, with no row in flight ("not enough free
        disk space for this row's result: ..."); None if it would. `what`: a file other
        than a row's result (a combined file), which is written without keeping the margin."""
        with self._changed:
            short = self._short_of(self._needs(result_bytes, answer_bytes), what)
        return short[1] if short is not None else None

    def _needs(self, result_bytes: int, answer_bytes: int) -> list[tuple[int, Path, int]]:
        """(disk, a folder on it, bytes) a result takes: the scratch folder's disk first."""
        needs = [(_disk(self.scratch), self.scratch, result_bytes + answer_bytes)]
        if self.outputs is not None and _disk(self.outputs) != needs[0][0]:
            needs.append((_disk(self.outputs), self.outputs, result_bytes))
        return needs

    def _short_of(self, needs: list[tuple[int, Path, int]], what: str = "") -> tuple[int, str] | None:
        """The first disk lacking the room asked of it, and why; None if all have it."""
        margin = 0 if what else self.margin_bytes
        for disk, folder, nbytes in needs:
            free = shutil.disk_usage(_existing(folder)).free
            if free - self._promised.get(disk, 0) - margin < nbytes:
                kept = f" and {human_size(margin)} is kept for the run's own files" if margin else ""
                what = what or "this row's result"
                return disk, (  # told only when no row holds room there: none of the free space is promised
                    f"not enough free disk space for {what}: it takes up to "
                    f"{human_size(nbytes)} in {folder}, where {human_size(free)} is free{kept}"
                )
        return None

    def _give_back(self, disk: int, nbytes: int, last: bool) -> None:
        with self._changed:
            self._promised[disk] -= nbytes
            if last:
                self._holders[disk] -= 1
            self._changed.notify_all()


class Promise:
    """Room on disk for one row's result, counted from `make()` until `close()`."""

    def __init__(self, room: DiskRoom, result_bytes: int, answer_bytes: int) -> None:
        self._room = room
        self._result_bytes = result_bytes
        self._answer_bytes = answer_bytes
        self._held: list[tuple[int, Path, int]] | None = None  # (disk, a folder on it, bytes), once made
        self._written = False

    def make(self, give_up: Callable[[], bool] = lambda: False, waiting: Callable[[], None] = lambda: None) -> bool:
        """Count the room as taken, waiting (`waiting()` told once) while rows in flight hold
        what is missing; False if `give_up()` turned true meanwhile (nothing taken). Raises
        RowError (nothing taken) when a disk lacks it and no row holds room there. Once
        made, making it again changes nothing."""
        if self._held is None:
            held = self._room._take(self._result_bytes, self._answer_bytes, give_up, waiting)
            if held is None:
                return False
            self._held = held
        return True

    def gone(self) -> str | None:
        """Why the room made is no longer there, as the row's create is about to go out (the
        disk filled up while it waited its turn: sent now, it would be paid for and fail);
        None while it is, or before it is made."""
        return self._room._gone(self._held) if self._held else None

    def written(self) -> None:
        """The result is in the scratch folder, where it now takes its room itself."""
        if self._held and not self._written:
            self._written = True
            disk, folder, nbytes = self._held[0]
            self._room._give_back(disk, self._result_bytes, last=False)
            self._held[0] = (disk, folder, nbytes - self._result_bytes)

    def close(self) -> None:
        """The row is done with the disk: whatever is still promised is free again."""
        for disk, _, nbytes in self._held or ():
            self._room._give_back(disk, nbytes, last=True)
        self._held = []

    def __enter__(self) -> Promise:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def full_disk(folder: Path, exc: BaseException) -> str | None:
    """Why a write into `folder` failed, when it was for want of room ("the disk holding
    x is full: 0 B free"), else None."""
    if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
        return f"the disk holding {folder} is full ({exc.strerror})"
    if isinstance(exc, OSError) and exc.errno in NOT_ROOM_ERRNOS:
        return None  # a read-only disk or a folder one may not write: whatever room it has
    try:
        free = shutil.disk_usage(_existing(folder)).free
    except OSError:
        return None
    return f"the disk holding {folder} is full ({human_size(free)} free)" if free < FULL_BYTES else None


def _disk(folder: Path) -> int:
    return os.stat(_existing(folder)).st_dev


def _existing(folder: Path) -> Path:
    """`folder`, or its nearest parent that exists (a folder made only when first written)."""
    path = folder.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
