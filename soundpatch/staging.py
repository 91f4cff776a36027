"""Where prepared clips wait for a hosted provider to fetch them: an S3 prefix, presigned.

The clip is uploaded under `storage.staging`, handed over as a presigned GET URL that
expires (long enough for the provider to fetch it, short enough not to linger), and
deleted once the prediction is over. An `s3://` input the model can take as it is is
presigned directly, without a copy.

Rows sending the very same clip (variations of one source and region: other prompts,
other seeds) share one upload: a clip is named by its content, uploaded by the first row
that needs it, and deleted when the last row using it is done. The names carry a token of
this process, so clips an earlier attempt left behind (deleted on the rerun, row by row)
are never the ones this attempt is using.

A bucket that stops taking clips (an outage, credentials that expired overnight) would
fail every row left the same way, each after its retries; once `after` uploads in a row
have failed, no more are tried this run (providers/reach.py): the rows left are not sent,
and say why.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from dataclasses import dataclass, field

from soundpatch.errors import ConfigError, RowError
from soundpatch.providers.base import OutOfReach
from soundpatch.providers.reach import Reach
from soundpatch.s3 import S3, S3Uri

EXPIRES_SECONDS = 3600


@dataclass(frozen=True)
class StagedClip:
    url: str
    uri: S3Uri | None  # None when nothing was uploaded (an input presigned as it is)


@dataclass
class _Shared:
    """One clip in use by `users` rows; its lock is held while it is uploaded or deleted."""

    users: int = 0
    uploaded: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class Staging:
    def __init__(self, s3: S3, prefix: str | None, expires_seconds: int = EXPIRES_SECONDS, after: int = 3) -> None:
        if not prefix or not prefix.startswith("s3://"):
            raise ConfigError(
                "Hosted providers fetch clips by URL: set storage.staging to an s3://bucket/prefix/ "
                "they can be presigned from."
            )
        self.s3 = s3
        self.prefix = S3Uri.parse(prefix)
        self.expires_seconds = expires_seconds
        self._token = secrets.token_hex(4)
        self._lock = threading.Lock()
        self._clips: dict[str, _Shared] = {}  # staged uri -> its users
        self.reach = Reach(after, tries=f"clips sent to the staging bucket ({self.prefix})")

    def ready(self) -> None:
        """Raise ConfigError (once, before any row) if the staging bucket is missing or out of reach."""
        self.s3.check_bucket(self.prefix, "storage.staging")

    def uri_for(self, data: bytes, folder: str) -> S3Uri:
        """Where `stage` puts the clip: known before the upload, so it can be journaled first."""
        return self.prefix.child(f"{folder}/{self._token}-{hashlib.sha256(data).hexdigest()[:32]}.wav")

    def within_reach(self) -> None:
        """Raise OutOfReach once uploads to the bucket have failed many times in a row."""
        lost = self.reach.lost()
        if lost is not None:
            raise OutOfReach(f"Not sent: {lost}", until="the staging bucket answers")

    def stage(self, data: bytes, folder: str, content_type: str = "audio/wav") -> StagedClip:
        """The clip under `folder`, uploaded unless a row using the same one already did;
        give it back with `remove`."""
        uri = self.uri_for(data, folder)
        with self._lock:
            shared = self._clips.setdefault(str(uri), _Shared())
            shared.users += 1
        try:
            with shared.lock:
                if not shared.uploaded:
                    try:
                        self.s3.write(uri, data, content_type)
                    except RowError as exc:
                        self.reach.missed(str(exc))
                        raise
                    self.reach.answered()
                    shared.uploaded = True
        except BaseException:
            self.remove(StagedClip("", uri))
            raise
        return StagedClip(self.s3.presign(uri, self.expires_seconds), uri)

    def share(self, source: str) -> StagedClip:
        return StagedClip(self.s3.presign(S3Uri.parse(source), self.expires_seconds), None)

    def remove(self, clip: StagedClip) -> None:
        """This row is done with the clip: deleted if no other row is using it."""
        if clip.uri is None:
            return
        key = str(clip.uri)
        with self._lock:
            shared = self._clips.get(key)
            if shared is not None:
                shared.users -= 1
                if shared.users > 0:
                    return
        if shared is None:  # not staged by this process
            self.s3.delete(clip.uri)
            return
        with shared.lock:  # a row staging it meanwhile waits, then uploads it again
            with self._lock:
                if shared.users > 0:
                    return  # a row took it up again: it stays
            if shared.uploaded:
                shared.uploaded = False
                self.s3.delete(clip.uri)
            with self._lock:
                if shared.users == 0 and self._clips.get(key) is shared:
                    del self._clips[key]
