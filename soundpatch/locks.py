"""Locks between processes on this machine, so that two of them never pay for the same edit.

- `RunLock`: one process at a time works on a run id. Two processes resuming the same run
  (a second terminal, a flow run retried while its first worker still runs) would each send
  every row the journal does not show as done, and pay for it twice. The second is refused
  with one sentence naming the first.
- `Claims`: one producer at a time per edit identity among the processes writing the same
  output store, whatever their run ids (two runs of overlapping manifests at once). The
  second waits, then reuses the first one's result at no cost. Rows sending a hosted model
  the same clip for other damaged spans claim the model's answer instead (batch.py): the
  second is spliced from the answer the first kept with the results.

Both are `flock` locks: the kernel drops them when their process ends, however it ends
(kill -9 included), so a crash never leaves a stale lock behind. They hold among processes
of one machine. Across machines, when the outputs are in a bucket, a run is held by a
lease there (lease.py) and an edit by a claim there (edit_claims.py); deploy/prefect.yaml
runs one nightly flow run at a time.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from soundpatch.errors import SoundpatchError

RUN_LOCK_FILE = "run.lock"
CLAIM_POLL_SECONDS = 0.2
CLAIMED, WAITED, STOPPED = "claimed", "waited", "stopped"  # what Claims.claim yields


class RunBusy(SoundpatchError):
    """Another process is working on this run id."""


_guard = threading.Lock()
_held_runs: dict[str, list[int]] = {}  # lock file -> [fd, holders in this process]


class RunLock:
    """Held while this process works on a run. Re-entrant within the process: the command
    takes it before Prefect starts (a busy run is refused at once) and the flow again."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / RUN_LOCK_FILE
        self._key = str(self.path.absolute())
        self._held = False

    def acquire(self) -> RunLock:
        with _guard:
            if self._held:
                return self
            entry = _held_runs.get(self._key)
            if entry is not None:
                entry[1] += 1
                self._held = True
                return self
            self._lock_file()
        return self

    def take_if_stopped(self) -> bool:
        """Take the lock only if no process is running the run, this one included (whose
        own runs re-enter it): True if taken (`release` it)."""
        with _guard:
            if self._key in _held_runs:
                return False
            try:
                self._lock_file()
            except RunBusy:
                return False
        return True

    def _lock_file(self) -> None:
        """Lock the run's file for this process (under _guard); raises RunBusy naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunBusy(
                f"Run {self.path.parent.name} is already going ({holder}); wait for it to end, "
                "or give this run another --run-id"
            ) from None
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} since {since}".encode(), 0)
        _held_runs[self._key] = [fd, 1]
        self._held = True

    def release(self) -> None:
        with _guard:
            if not self._held:
                return
            self._held = False
            entry = _held_runs[self._key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held_runs[self._key]
                os.close(entry[0])  # closing the last descriptor drops the lock


def run_going(run_dir: Path) -> bool:
    """Whether a process (this one included) is running the run now: its lock is held. A
    run folder one may not lock is taken to be going."""
    lock = RunLock(run_dir)
    try:
        taken = lock.take_if_stopped()
    except OSError:
        return True
    if taken:
        lock.release()
    return not taken


class Claims:
    """Who produces which edit, among this machine's processes writing one output store."""

    def __init__(self, output_uri: str) -> None:
        where = output_uri if "://" in output_uri else str(Path(output_uri).expanduser().absolute())
        store = hashlib.sha256(where.encode()).hexdigest()[:16]
        self.folder = Path(tempfile.gettempdir()) / f"soundpatch-claims-{os.getuid()}" / store

    @contextmanager
    def claim(self, identity: str, give_up: Callable[[], bool]) -> Iterator[str]:
        """Held while this process alone produces `identity`. Yields CLAIMED, or WAITED when
        another process held it first (its result may now be in the store), or STOPPED if
        `give_up()` turned true while waiting (the run is stopping; nothing is held)."""
        path = self.folder / identity
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, how = -1, CLAIMED
        while fd < 0:
            candidate = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(candidate, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(candidate)
                if give_up():
                    yield STOPPED
                    return
                how = WAITED
                time.sleep(CLAIM_POLL_SECONDS)
                continue
            # The holder before us removes the file as it lets go: a lock on a file that is no
            # longer the one at `path` holds nothing. Then try again on the new one.
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = -1
            if current == os.fstat(candidate).st_ino:
                fd = candidate
            else:
                os.close(candidate)
        try:
            yield how
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            os.close(fd)
