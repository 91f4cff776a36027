"""S3-compatible object storage (AWS S3, MinIO, R2, Ceph, Wasabi) through boto3.

Credentials come from boto3's usual chain (environment, profile, instance role);
`storage.s3.endpoint_url` or AWS_ENDPOINT_URL points it elsewhere. Errors become one
sentence naming the bucket and key and what to check.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from urllib.parse import unquote

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from soundpatch.config import S3Config
from soundpatch.errors import RowError

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


class S3:
    """One boto3 client per process (clients are thread-safe), created on first use."""

    def __init__(self, config: S3Config) -> None:
        self._config = config
        self._client = None
        self._lock = threading.Lock()

    @property
    def client(self):  # noqa: ANN201 - boto3 clients are generated classes
        with self._lock:
            if self._client is None:
                self._client = boto3.session.Session().client(
                    "s3",
                    endpoint_url=self._config.endpoint_url,  # None: AWS_ENDPOINT_URL or AWS
                    region_name=self._config.region,
                    config=_BOTO,
                )
            return self._client

    def read(self, uri: S3Uri, max_bytes: int) -> bytes:
        try:
            response = self.client.get_object(Bucket=uri.bucket, Key=uri.key)
            size = int(response.get("ContentLength") or 0)
            if size > max_bytes:
                response["Body"].close()
                raise RowError(f"{uri} is {size / 1e6:.0f} MB, over the {max_bytes / 1e6:.0f} MB limit")
            data = response["Body"].read(max_bytes + 1)
        except (ClientError, BotoCoreError) as exc:
            raise RowError(describe(exc, uri, "read")) from None
        if len(data) > max_bytes:
            raise RowError(f"{uri} is over the {max_bytes / 1e6:.0f} MB limit")
        return data

    def write(self, uri: S3Uri, data: bytes, content_type: str, metadata: dict[str, str] | None = None) -> None:
        try:
            self.client.put_object(
                Bucket=uri.bucket, Key=uri.key, Body=data, ContentType=content_type, Metadata=metadata or {}
            )
        except (ClientError, BotoCoreError) as exc:
            raise RowError(describe(exc, uri, "write")) from None

    def delete(self, uri: S3Uri) -> None:
        try:
            self.client.delete_object(Bucket=uri.bucket, Key=uri.key)
        except (ClientError, BotoCoreError):
            pass  # staging clean-up is best effort; a lifecycle rule catches what is left

    def presign(self, uri: S3Uri, expires_seconds: int) -> str:
        try:
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": uri.bucket, "Key": uri.key}, ExpiresIn=expires_seconds
            )
        except (ClientError, BotoCoreError) as exc:
            raise RowError(describe(exc, uri, "presign")) from None


def describe(exc: Exception, uri: S3Uri, action: str) -> str:
    """One sentence a user can act on, naming the bucket and key."""
    if isinstance(exc, NoCredentialsError):
        return (
            f"Cannot {action} {uri}: no S3 credentials found (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        )
    if isinstance(exc, EndpointConnectionError):
        return f"Cannot {action} {uri}: the S3 endpoint does not answer ({exc.kwargs.get('endpoint_url', '')})"
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return f"Cannot {action} {uri}: bucket {uri.bucket!r} does not exist (check the name and endpoint)"
        if code in ("NoSuchKey", "404") or status == 404:
            return f"Cannot {action} {uri}: no such object"
        if code in ("AccessDenied", "403", "AllAccessDisabled") or status == 403:
            return f"Cannot {action} {uri}: access denied (check the credentials' permissions on the bucket)"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"Cannot {action} {uri}: the S3 credentials are not valid for this endpoint ({code})"
        return f"Cannot {action} {uri}: {code or status} {exc.response.get('Error', {}).get('Message', '')}".strip()
    return f"Cannot {action} {uri}: {type(exc).__name__}: {exc}"
