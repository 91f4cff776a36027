"""S3-compatible object storage (AWS S3, MinIO, R2, Ceph, Wasabi) through boto3.

Credentials come from boto3's usual chain (environment, profile, instance role);
`storage.s3.endpoint_url` or AWS_ENDPOINT_URL points it elsewhere. Errors become one
sentence naming the bucket and key and what to check.
"""

from __future__ import annotations

import io
import threading
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError, SSLError

from soundpatch import tls
from soundpatch.config import S3Config
from soundpatch.errors import ConfigError, RowError, lasting_tls_failure, network_reason
from soundpatch.humanize import over_limit

# S3 throttling (503 SlowDown) and transient network errors are retried by botocore
# itself with exponential backoff and jitter ("adaptive" also paces the client).
_BOTO = BotoConfig(retries={"max_attempts": 8, "mode": "adaptive"}, connect_timeout=10, read_timeout=60)


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        if not uri.startswith("s3://"):
            raise ValueError(f"{uri!r} is not an s3:// URI")
        rest = uri[len("s3://") :]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise RowError(f"{uri} names no bucket")
        return cls(bucket, unquote(key))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def child(self, name: str) -> S3Uri:
        prefix = self.key if not self.key or self.key.endswith("/") else self.key + "/"
        return S3Uri(self.bucket, prefix + name)


class NoConditionalWrites(RowError):
    """The store does not do conditional writes (If-Match, If-None-Match on PUT)."""


class NoSuchObject(RowError):
    """The bucket answered that it holds no object under the key (NoSuchKey)."""


class S3:
    """One boto3 client per process (clients are thread-safe), created on first use.

    `connections`: how many threads may use it at once. boto3 keeps 10 connections; a
    batch's rows stage, read and publish from dozens of threads, and every request past
    the tenth opened a new connection and threw it away after (with a warning on screen).
    """

    def __init__(self, config: S3Config, connections: int = 10) -> None:
        self._config = config
        self._connections = max(10, connections)
        self._client = None
        self._lock = threading.Lock()
        # Buckets found missing or out of reach (no credentials, endpoint down): later reads
        # fail at once with the same sentence instead of waiting through retries per row.
        self._unreachable: dict[str, Exception] = {}

    @property
    def client(self):  # noqa: ANN201 - boto3 clients are generated classes
        with self._lock:
            if self._client is None:
                tls.check_s3_bundle()  # boto3 reads AWS_CA_BUNDLE itself, at the first request
                self._client = boto3.session.Session().client(
                    "s3",
                    endpoint_url=self._config.endpoint_url,  # None: AWS_ENDPOINT_URL or AWS
                    region_name=self._config.region,
                    config=_BOTO.merge(BotoConfig(max_pool_connections=self._connections)),
                )
            return self._client

    def read_into(self, uri: S3Uri, max_bytes: int, sink: BinaryIO) -> str:
        """The object's bytes, a megabyte at a time into `sink` (an input hours long is never
        held as bytes), or RowError with one sentence; over `max_bytes`, refused. Returns the
        ETag of the version read."""
        known = self._unreachable.get(uri.bucket)
        if known is not None:
            raise RowError(describe(known, uri, "read"))
        size = 0
        try:
            response = self.client.get_object(Bucket=uri.bucket, Key=uri.key)
            declared = int(response.get("ContentLength") or 0)
            with closing(response["Body"]) as body:
                if declared > max_bytes:
                    raise RowError(over_limit(str(uri), max_bytes, declared))
                for chunk in body.iter_chunks(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        raise RowError(over_limit(str(uri), max_bytes))
                    sink.write(chunk)
            return str(response.get("ETag") or "")
        except (ClientError, BotoCoreError) as exc:
            if _whole_bucket(exc):
                self._unreachable[uri.bucket] = exc
            missing = isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") == "NoSuchKey"
            raise (NoSuchObject if missing else RowError)(describe(exc, uri, "read")) from None

    def read_range(self, uri: S3Uri, start: int, stop: int, etag: str) -> bytes:
        """Bytes `start` to `stop` - 1 of the object, of its version `etag` alone (a changed
        object is refused: PreconditionFailed). Raises what boto3 raises (ranged.py)."""
        response = self.client.get_object(
            Bucket=uri.bucket, Key=uri.key, Range=f"bytes={start}-{stop - 1}", IfMatch=etag
        )
        with closing(response["Body"]) as body:
            return body.read(stop - start + 1)  # (a byte more: a store that sent it all is found out)

    def write(self, uri: S3Uri, data: bytes, content_type: str, metadata: dict[str, str] | None = None) -> None:
        try:
            self.client.put_object(
                Bucket=uri.bucket, Key=uri.key, Body=data, ContentType=content_type, Metadata=metadata or {}
            )
        except (ClientError, BotoCoreError) as exc:
            raise RowError(describe(exc, uri, "write")) from None

    def upload(self, uri: S3Uri, data: bytes | Path, content_type: str, metadata: dict[str, str]) -> None:
        """Managed upload of bytes or of a file (read a part at a time): one PUT for small
        objects, multipart (parallel parts) past the threshold."""
        threshold = int(self._config.multipart_threshold_mb * 1024 * 1024)
        transfer = TransferConfig(multipart_threshold=threshold, multipart_chunksize=max(threshold, 5 << 20))
        extra = {"ContentType": content_type, "Metadata": metadata}
        try:
            if isinstance(data, Path):  # by its name: boto3 then reads each part as it sends it
                self.client.upload_file(str(data), uri.bucket, uri.key, ExtraArgs=extra, Config=transfer)
            else:
                self.client.upload_fileobj(io.BytesIO(data), uri.bucket, uri.key, ExtraArgs=extra, Config=transfer)
        except (ClientError, BotoCoreError) as exc:
            raise RowError(describe(exc, uri, "write")) from None
        except boto3.exceptions.S3UploadFailedError as exc:
            raise RowError(describe(_cause(exc), uri, "write")) from None

    def copy(self, source: S3Uri, target: S3Uri, metadata: dict[str, str] | None = None) -> None:
        """Server-side copy (nothing passes through this machine); new metadata if given."""
        extra = {"MetadataDirective": "REPLACE", "Metadata": metadata} if metadata is not None else {}
        if metadata is not None:
            head = self.head(source)
            if head is not None and head.get("ContentType"):
                extra["ContentType"] = head["ContentType"]
        try:
            self.client.copy(
                {"Bucket": source.bucket, "Key": source.key}, target.bucket, target.key, ExtraArgs=extra or None
            )
        except (ClientError, BotoCoreError) as exc:
            raise RowError(describe(exc, target, "copy to")) from None

    def head(self, uri: S3Uri) -> dict | None:
        """The object's headers, or None if there is no such object."""
        try:
            return self.client.head_object(Bucket=uri.bucket, Key=uri.key)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise RowError(describe(exc, uri, "look up")) from None
        except BotoCoreError as exc:
            raise RowError(describe(exc, uri, "look up")) from None

    def get(self, uri: S3Uri, max_bytes: int) -> bytes | None:
        """An object's bytes, or None if there is no such object."""
        got = self.get_tagged(uri, max_bytes)
        return None if got is None else got[0]

    def get_tagged(self, uri: S3Uri, max_bytes: int) -> tuple[bytes, str] | None:
        """An object's bytes and the ETag of that version, from one GET; None if there is no
        such object (as the GET said, else as a HEAD then says: a store may answer a missing
        key's GET otherwise)."""
        body = io.BytesIO()
        try:
            etag = self.read_into(uri, max_bytes, body)
        except NoSuchObject:
            return None
        except RowError:
            if self.head(uri) is None:
                return None
            raise
        return body.getvalue(), etag

    def keys(self, prefix: S3Uri) -> list[str]:
        """Every key under a prefix, in the order S3 lists them (lexicographic)."""
        found = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=prefix.bucket, Prefix=prefix.key):
                found.extend(obj["Key"] for obj in page.get("Contents", []))
        except (ClientError, BotoCoreError) as exc:
            raise RowError(describe(exc, prefix, "list")) from None
        return found

    def check_bucket(self, uri: S3Uri, purpose: str) -> None:
        """Raise ConfigError (once, before any row) if the bucket is missing or out of reach."""
        try:
            self.client.head_bucket(Bucket=uri.bucket)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = exc.response.get("Error", {}).get("Code", "")
            if status == 404 or code in ("404", "NoSuchBucket"):
                raise ConfigError(
                    f"{purpose} {uri}: bucket {uri.bucket!r} does not exist (check the name and "
                    "storage.s3.endpoint_url)."
                ) from None
            if status == 403 or code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise ConfigError(
                    f"{purpose} {uri}: access denied to bucket {uri.bucket!r} (check the credentials "
                    "(AWS_ACCESS_KEY_ID / AWS_PROFILE) and their permissions on the bucket)."
                ) from None
            raise ConfigError(as_config_sentence(describe(exc, uri, "reach"), purpose)) from None
        except BotoCoreError as exc:
            raise ConfigError(as_config_sentence(describe(exc, uri, "reach"), purpose)) from None

    def put_if(
        self, uri: S3Uri, data: bytes, metadata: dict[str, str], if_match: str | None, content_type: str = "text/plain"
    ) -> str | None:
        """A conditional PUT: only if there is no such object (`if_match` None), or only if it
        still has the ETag `if_match`. The new ETag, or None if the condition did not hold."""
        condition = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}
        try:
            response = self.client.put_object(
                Bucket=uri.bucket, Key=uri.key, Body=data, ContentType=content_type, Metadata=metadata, **condition
            )
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (404, 409, 412):  # gone, written meanwhile by another, or not as expected
                return None
            if status == 501 or exc.response.get("Error", {}).get("Code") == "NotImplemented":
                raise NoConditionalWrites(describe(exc, uri, "write")) from None
            raise RowError(describe(exc, uri, "write")) from None
        except BotoCoreError as exc:
            raise RowError(describe(exc, uri, "write")) from None
        return str(response["ETag"])

    def age(self, uri: S3Uri) -> tuple[str, float, dict[str, str]] | None:
        """(ETag, seconds since it was last written, metadata) of an object, both times by
        the store's own clock (machines' clocks may differ); None if there is no such object."""
        head = self.head(uri)
        if head is None:
            return None
        now = _server_time(head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date"))
        return str(head["ETag"]), (now - head["LastModified"]).total_seconds(), head.get("Metadata", {})

    def delete(self, uri: S3Uri) -> None:
        try:
            self.client.delete_object(Bucket=uri.bucket, Key=uri.key)
        except (ClientError, BotoCoreError):
            pass  # staging clean-up is best effort; a lifecycle rule catches what is left

    def delete_keys(self, bucket: str, keys: list[str]) -> None:
        """Delete many objects, a thousand a request (best effort, like `delete`)."""
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            try:
                self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            except (ClientError, BotoCoreError):
                pass

    def presign(self, uri: S3Uri, expires_seconds: int) -> str:
        try:
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": uri.bucket, "Key": uri.key}, ExpiresIn=expires_seconds
            )
        except (ClientError, BotoCoreError) as exc:
            raise RowError(describe(exc, uri, "presign")) from None


def _server_time(date: str | None) -> datetime:
    """The time an answer's Date header gives (this machine's clock if it gives none). Two
    Date headers (a proxy in between adds its own) come joined by a comma: the last counts."""
    try:
        when = parsedate_to_datetime(date.split(",", 2)[-1] if date and date.count(",") > 1 else date or "")
    except (TypeError, ValueError):
        return datetime.now(UTC)
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _whole_bucket(exc: Exception) -> bool:
    """Whether the failure concerns every key of the bucket, not just this one."""
    if isinstance(exc, (NoCredentialsError, EndpointConnectionError)) or _lasting_tls(exc):
        return True
    if isinstance(exc, ClientError):
        return exc.response.get("Error", {}).get("Code", "") in (
            "NoSuchBucket",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
        )
    return False


def _lasting_tls(exc: Exception) -> bool:
    """A TLS failure no retry mends: a certificate not trusted here, an endpoint not speaking TLS."""
    return isinstance(exc, SSLError) and lasting_tls_failure(exc)


def _cause(exc: Exception) -> Exception:
    """boto3's managed transfers wrap the ClientError (raised from it, or, uploading a file
    by its name, while handling it); unwrap it for a precise message."""
    for inner in (exc.__cause__, exc.__context__):
        if isinstance(inner, (ClientError, BotoCoreError)):
            return inner
    return exc


def as_config_sentence(message: str, purpose: str) -> str:
    return f"{purpose}: {message[:1].lower()}{message[1:].rstrip('.')}."


def describe(exc: Exception, uri: S3Uri, action: str) -> str:
    """One sentence a user can act on, naming the bucket and key."""
    if isinstance(exc, NoCredentialsError):
        return (
            f"Cannot {action} {uri}: no S3 credentials found (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        )
    if isinstance(exc, EndpointConnectionError):
        return f"Cannot {action} {uri}: the S3 endpoint does not answer ({exc.kwargs.get('endpoint_url', '')})"
    if _lasting_tls(exc):
        reason = network_reason(exc, bundle="AWS_CA_BUNDLE", whose="the S3 endpoint's")
        return f"Cannot {action} {uri}: {reason}"
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return f"Cannot {action} {uri}: bucket {uri.bucket!r} does not exist (check the name and endpoint)"
        if code in ("NoSuchKey", "404") or status == 404:
            return f"Cannot {action} {uri}: no such object"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"Cannot {action} {uri}: the S3 credentials are not valid for this endpoint ({code})"
        if code in ("AccessDenied", "403", "AllAccessDisabled") or status == 403:
            return f"Cannot {action} {uri}: access denied (check the credentials' permissions on the bucket)"
        return f"Cannot {action} {uri}: {code or status} {exc.response.get('Error', {}).get('Message', '')}".strip()
    return f"Cannot {action} {uri}: {type(exc).__name__}: {exc}"
