"""A manifest kept in a bucket or on a web server: `soundpatch run s3://jobs/nightly.yaml`.

A scheduled deployment's manifest can live beside its audio, to be changed there without
deploying anything again; its inputs' names are relative to where it is (manifest.py's
`beside`). It is read as an input is: S3 with the configured endpoint and credentials,
http(s) with the same address checks and timeout (storage.http), and no larger than
MAX_MANIFEST_BYTES.
"""

from __future__ import annotations

import io

from soundpatch import web
from soundpatch.config import StorageConfig
from soundpatch.errors import ManifestError, RowError
from soundpatch.humanize import size
from soundpatch.manifest import Manifest, load_manifest
from soundpatch.s3 import S3, NoSuchObject, S3Uri

# A manifest is read whole: a million rows of CSV is some 100 MB.
MAX_MANIFEST_BYTES = 256 * 2**20


def read_manifest(given: str, storage: StorageConfig) -> Manifest:
    """The manifest at `given`: a local file, an s3:// key or an http(s):// URL."""
    return load_manifest(given, fetch=lambda uri: fetch_manifest(uri, storage))


def fetch_manifest(uri: str, storage: StorageConfig, max_bytes: int = MAX_MANIFEST_BYTES) -> bytes:
    """The bytes of the manifest at `uri`, or ManifestError with one sentence."""
    sink = _Capped(max_bytes)
    shown = web.shown(uri)
    try:
        if uri.startswith("s3://"):
            S3(storage.s3).read_into(S3Uri.parse(uri), UNCAPPED, sink)
        else:
            web.fetch_into(uri, storage.http, UNCAPPED, sink)
    except NoSuchObject:
        raise ManifestError(f"Manifest {shown} does not exist.") from None
    except RowError as exc:
        why = str(exc).rstrip(".")
        for said in (f"Cannot read {uri}: ", f"Cannot fetch {shown}: ", f"Refused to fetch {shown}: "):
            why = why.removeprefix(said)  # (said once, as the manifest's)
        raise ManifestError(f"Cannot read manifest {shown}: {why}.") from None
    except _TooLarge:
        raise ManifestError(
            f"Manifest {shown} is over {size(max_bytes)}, more than a manifest is read whole; split it."
        ) from None
    return sink.getvalue()


UNCAPPED = 2**62  # (the manifest's own cap is the sink's: an input's, storage.max_input_mb, is not its)


class _TooLarge(Exception):
    pass


class _Capped(io.BytesIO):
    """Bytes kept in memory up to a cap; more raises _TooLarge."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes

    def write(self, chunk: bytes) -> int:  # type: ignore[override]
        if self.tell() + len(chunk) > self.max_bytes:
            raise _TooLarge
        return super().write(chunk)
