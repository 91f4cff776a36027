"""One machine at a time on a run: a lease object in the output bucket.

The run lock (locks.py) keeps a second process of this machine off a run. With its
journal copied to the bucket (journal_copy.py) a run can be resumed on another machine,
and so it could also be started there while it still goes here (a flow run retried while
its first worker still runs, the same command on a laptop and on a server): both would
send every row not yet done, and pay for it twice. So a run whose outputs are in a
bucket also holds `<output.uri>/.soundpatch/runs/<run_id>/lease`, written with S3's
conditional writes:

- taken only if there is none (If-None-Match: *), or in the place of one (If-Match on its
  ETag: of two machines taking it up, one wins) that has not been renewed for
  `storage.s3.lease_seconds` by the bucket's own clock (its holder is gone), or that was
  held by an earlier process with this run folder (it died: this one has the run lock);
- renewed every sixth of that (If-Match on the ETag this holder last wrote);
- given back when the run ends.

A holder that could not renew it for two thirds of `lease_seconds` (the bucket out of
reach), or that finds another machine took it, sends no more creates: its rows not yet
sent end Not started; predictions already made are still collected (that costs nothing).

An S3-compatible store without conditional writes takes every PUT; there the lease keeps
no one out (AWS S3, MinIO, R2 and Ceph have them).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from soundpatch.errors import RowError
from soundpatch.journal_copy import RUNS_PREFIX
from soundpatch.locks import RunBusy
from soundpatch.s3 import S3, S3Uri

LEASE_FILE = "lease"  # in the run folder: the token of the last lease a process of it took
log = logging.getLogger("soundpatch")


def lease_uri(output: S3Uri, run_id: str) -> S3Uri:
    """Where run `run_id`'s lease is, beside its journal's copy under the output prefix."""
    return output.child(f"{RUNS_PREFIX}/{run_id}/lease")


class RunLease:
    def __init__(self, s3: S3, uri: S3Uri, run_id: str, run_dir: Path, seconds: float) -> None:
        self.s3, self.uri, self.run_id, self.run_dir = s3, uri, run_id, run_dir
        self.seconds = seconds
        self.renew_every = seconds / 6
        self.trusted_for = seconds * 2 / 3  # a create sent before then reaches the provider before it lapses
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        self._token = secrets.token_hex(8)
        holder = f"process {os.getpid()} on {socket.gethostname()} since {since}"
        self._metadata = {"holder": holder, "token": self._token}
        self._writes = 0
        self._etag: str | None = None
        self._renewed = 0.0  # when the last write that succeeded was sent (monotonic)
        self.lost = ""  # why this process no longer holds it, once it does not
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    def take(self) -> RunLease:
        """Hold the lease from now on, or raise RunBusy naming the machine that holds it."""
        sent = time.monotonic()
        etag = self.s3.put_if(self.uri, self._body(), self._metadata, if_match=None)
        there = self.s3.age(self.uri) if etag is None else None
        if there is not None and there[2].get("token") == self._token:
            etag = there[0]  # ours after all: the write landed and its answer was lost (then retried)
        if etag is None:
            if there is not None and there[1] < self.seconds and not self._ours_before(there[2]):
                holder = there[2].get("holder") or "another process"
                raise RunBusy(
                    f"Run {self.run_id} is going on another machine ({holder}; its lease in the bucket was renewed "
                    f"{max(there[1], 0):.0f} s ago and lapses {self.seconds:.0f} s after that); wait for it to end, "
                    "or give this run another --run-id"
                )
            # Lapsed (its holder is gone), ours (an earlier process of this run folder, gone:
            # this one has the run lock), or given back meanwhile: take its place, if no one else did.
            etag = self.s3.put_if(self.uri, self._body(), self._metadata, if_match=there[0] if there else None)
            if etag is None:
                raise RunBusy(
                    f"Run {self.run_id} was taken up by another machine just now; wait for it to end, or give "
                    "this run another --run-id"
                )
        self._etag, self._renewed = etag, sent
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / LEASE_FILE).write_text(self._token + "\n", encoding="utf-8")
        self._keeper = threading.Thread(target=self._keep, name="soundpatch-run-lease", daemon=True)
        self._keeper.start()
        return self

    def _ours_before(self, metadata: dict[str, str]) -> bool:
        """Whether the lease there was taken by an earlier process with this run folder."""
        try:
            earlier = (self.run_dir / LEASE_FILE).read_text(encoding="utf-8").strip()
        except OSError:
            return False
        return bool(earlier) and metadata.get("token") == earlier

    def _body(self) -> bytes:
        """Unlike any other write of the lease: its ETag (the content's digest) tells whose it is."""
        self._writes += 1
        return f"{self._metadata['holder']}\n{self._token} {self._writes}\n".encode()

    def _keep(self) -> None:
        while not self._stop.wait(self.renew_every):
            sent = time.monotonic()
            try:
                etag = self.s3.put_if(self.uri, self._body(), self._metadata, if_match=self._etag)
                there = self.s3.age(self.uri) if etag is None else None
            except RowError as exc:
                log.warning("The run's lease in the bucket was not renewed: %s", exc)
                continue  # tried again; holds() turns false if it stays out of reach
            if there is not None and there[2].get("token") == self._token:
                self._etag = there[0]  # our last write landed and its answer was lost: renewed next time
                continue
            if etag is None:
                self.lost = "another machine took up this run after its lease in the bucket lapsed"
                log.warning("Run %s: %s; no more creates are sent from here.", self.run_id, self.lost)
                return
            self._etag, self._renewed = etag, sent

    def holds(self) -> bool:
        """Whether a create may still go out from this process."""
        return not self.lost and time.monotonic() - self._renewed < self.trusted_for

    def why_not(self) -> str:
        """Why a create may not go out from here (when `holds()` is false)."""
        return self.lost or f"the run's lease in the bucket could not be renewed for {self.trusted_for:.0f} s"

    def give_back(self) -> None:
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(timeout=30)
        if self._etag is None or self.lost:
            return
        try:
            there = self.s3.age(self.uri)
        except RowError:
            return  # it lapses by itself
        if there is not None and there[0] == self._etag:  # still ours: no one need wait out its lapse
            self.s3.delete(self.uri)
        self._etag = None
