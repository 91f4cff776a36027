"""Where prepared clips wait for a hosted provider to fetch them: an S3 prefix, presigned.

The clip is uploaded under `storage.staging`, handed over as a presigned GET URL that
expires (long enough for the provider to fetch it, short enough not to linger), and
deleted once the prediction is over. An `s3://` input the model can take as it is is
presigned directly, without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

from soundpatch.errors import ConfigError
from soundpatch.s3 import S3, S3Uri

EXPIRES_SECONDS = 3600


@dataclass(frozen=True)
class StagedClip:
    url: str
    uri: S3Uri | None  # None when nothing was uploaded (an input presigned as it is)


class Staging:
    def __init__(self, s3: S3, prefix: str | None, expires_seconds: int = EXPIRES_SECONDS) -> None:
        if not prefix or not prefix.startswith("s3://"):
            raise ConfigError(
                "Hosted providers fetch clips by URL: set storage.staging to an s3://bucket/prefix/ "
                "they can be presigned from."
            )
        self.s3 = s3
        self.prefix = S3Uri.parse(prefix)
        self.expires_seconds = expires_seconds

    def ready(self) -> None:
        """Raise ConfigError (once, before any row) if the staging bucket is missing or out of reach."""
        self.s3.check_bucket(self.prefix, "storage.staging")

    def stage(self, data: bytes, name: str, content_type: str = "audio/wav") -> StagedClip:
        uri = self.prefix.child(name)
        self.s3.write(uri, data, content_type)
        return StagedClip(self.s3.presign(uri, self.expires_seconds), uri)

    def share(self, source: str) -> StagedClip:
        return StagedClip(self.s3.presign(S3Uri.parse(source), self.expires_seconds), None)

    def remove(self, clip: StagedClip) -> None:
        if clip.uri is not None:
            self.s3.delete(clip.uri)
