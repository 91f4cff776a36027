"""What runs writing to one output store learned of their remote recordings: the SHA-256 of
each version read, by its stamp (an S3 ETag, a web server's ETag or Last-Modified; with the
length).

A result's identity counts its recording's content (identity.py). So telling whether a row
is done already needs the SHA-256 of its recording's bytes, and for a recording in a bucket
that is a download: of every tape of an archive, by `soundpatch validate`, before anything
is spent. A run that reads a remote recording leaves a record of it in the output store's
index; an estimate takes the recording's checksum from it while the recording still bears
that stamp (SourceReader.vouch), and reads the header alone (ranged.py).

Where no record is found, no run writing here has read that version of the recording, and
no result here can be of it. The estimate then counts its rows as to be sent without
downloading it: it can be too high only where a byte-identical copy elsewhere was edited
the same way (the run itself finds that result and reuses it, at no cost).
"""

from __future__ import annotations

import hashlib
import logging
import threading

from soundpatch import web
from soundpatch.errors import SoundpatchError
from soundpatch.sources import SourceReader, remote
from soundpatch.storage import OutputStore

log = logging.getLogger(__name__)


def _key(uri: str) -> str:
    """Where a recording's record is, by its address without a query (it may hold a token)."""
    return "sources/" + hashlib.sha256(web.shown(uri).encode()).hexdigest()


class SourceRecords:
    def __init__(self, store: OutputStore, sources: SourceReader) -> None:
        self._store = store
        self._sources = sources
        self._done: set[str] = set()  # looked up or recorded already, by this run
        self._lock = threading.Lock()

    def _first_time(self, what: str) -> bool:
        with self._lock:
            if what in self._done:
                return False
            self._done.add(what)
            return True

    def vouch(self, uri: str) -> None:
        """The recording's checksum, from an earlier run's record, if it is still that version."""
        if not remote(uri) or not self._first_time(f"vouch {uri}"):
            return
        try:
            record = self._store.get_record(_key(uri))
        except (SoundpatchError, OSError):
            return  # the estimate then goes without it
        if record and record.get("stamp") and record.get("sha256"):
            self._sources.vouch(uri, record["stamp"], record["sha256"])

    def remember(self, uri: str) -> None:
        """Record the version of `uri` this run read, and its checksum (once a run)."""
        stamp, checksum = self._sources.stamp(uri), self._sources.known_checksum(uri)
        if not remote(uri) or stamp is None or checksum is None or not self._first_time(f"remember {uri}"):
            return
        try:
            self._store.put_record(_key(uri), {"input": web.shown(uri), "stamp": stamp, "sha256": checksum})
        except (SoundpatchError, OSError) as exc:  # an estimate would download it instead
            log.warning("the record of %s was not kept in the output store: %s", web.shown(uri), exc)
