"""Fetching an `https://` input on a user's behalf, carefully.

A manifest is data, often written by someone else; a URL in it must not turn soundpatch
into a way to read from inside the network it runs in. So:

- the host's addresses are resolved first and every one must be public (not loopback,
  private, link-local, carrier-grade NAT, multicast or reserved), unless
  `storage.http.allow_private_addresses` is set; redirects are followed by hand, at most
  five, each hop checked the same way;
- the body is capped (`storage.max_input_mb`), by Content-Length before reading and by
  counting while reading; timeouts bound each read and the whole fetch;
- transient failures (connection errors, 5xx, 429) are retried with backoff.

Messages name the URL without its query string, which may hold a token.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from soundpatch import tls
from soundpatch.config import HttpConfig
from soundpatch.errors import RowError, lasting_tls_failure, network_reason
from soundpatch.humanize import over_limit
from soundpatch.retry import Retryable, RetryPolicy

MAX_REDIRECTS = 5
_POLICY = RetryPolicy(attempts=3, base_seconds=0.5, cap_seconds=5.0)


def shown(url: str) -> str:
    """The URL as messages show it: without query string or fragment (they may hold tokens)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


def shown_input(given: str) -> str:
    """An input as messages show it: a URL as `shown`, a path as it was given."""
    return shown(given) if "://" in given else given


def check_address(url: str, allow_private: bool) -> None:
    """Raise RowError unless every address the URL's host resolves to may be fetched."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RowError(f"{shown(url)} is not an http(s) URL with a host")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise RowError(f"Cannot fetch {shown(url)}: host {parts.hostname!r} does not resolve") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not address.is_global:
            raise RowError(
                f"Refused to fetch {shown(url)}: {parts.hostname} is a private or local address ({address}); "
                "set storage.http.allow_private_addresses: true to allow it"
            )


def fetch_into(url: str, config: HttpConfig, max_bytes: int, sink: BinaryIO) -> str | None:
    """The body of `url`, written into `sink` as it arrives (emptied first at each try), and
    the version the server named for it (`version`); or RowError with one sentence saying
    why not."""
    try:
        return _POLICY.call(lambda: _fetch_once(url, config, max_bytes, sink))
    except Retryable as exc:  # still failing after the last try
        raise RowError(str(exc)) from None


def stamp(url: str, config: HttpConfig) -> str | None:
    """The version of `url` the server names now (asked with HEAD, addresses checked as for
    a fetch); None when it names none or cannot say: then only a download tells."""
    try:
        with _client(config) as client, _answer(client, "HEAD", url, config) as response:
            return version(response) if response.status_code < 300 else None
    except (httpx.HTTPError, RowError):
        return None


@contextmanager
def byte_ranges(url: str, config: HttpConfig) -> Iterator[tuple[int, Callable[[int, int], bytes]] | None]:
    """The length of `url` and a fetch of its bytes `start` to `stop` - 1 (ranged.py), each
    of the version a HEAD found (If-Range: a server with another answers with all of it,
    which is refused unread), on one connection, addresses checked as for a fetch. None
    where the server names no length or no version, or does not say it gives ranges."""
    with _client(config) as client:
        try:
            with _answer(client, "HEAD", url, config) as head:
                length, validator = head.headers.get("content-length", ""), _validator(head)
                ranges = head.headers.get("accept-ranges", "").strip().lower() == "bytes"
                found = head.status_code == 200 and ranges and length.isdigit() and validator is not None
        except httpx.ConnectError as exc:
            if lasting_tls_failure(exc):  # as the download would say, without trying again
                raise RowError(f"Cannot fetch {shown(url)}: {network_reason(exc)}") from None
            found = False
        except (httpx.HTTPError, RowError):
            found = False  # the download tries again, or says why not
        if not found:
            yield None
            return

        def fetch(start: int, stop: int) -> bytes:
            asked = {"Range": f"bytes={start}-{stop - 1}", "If-Range": validator}
            with _answer(client, "GET", url, config, asked) as response:
                if response.status_code != 206:
                    raise OSError(f"asked for a range of {shown(url)}, the server answered HTTP {response.status_code}")
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > stop - start:
                        raise OSError(f"asked for {stop - start} bytes of {shown(url)}, the server sent more")
                return bytes(data)

        yield int(length), fetch


def _strong_etag(response: httpx.Response) -> str | None:
    """The answer's ETag, where it is a strong one: a weak one (W/) may stay the same for other bytes."""
    etag = response.headers.get("etag", "")
    return etag if etag and not etag.startswith("W/") else None


def _validator(response: httpx.Response) -> str | None:
    """What names this version in an If-Range: a strong ETag, else Last-Modified."""
    return _strong_etag(response) or response.headers.get("last-modified") or None


def version(response: httpx.Response) -> str | None:
    """What names this version of a resource: a strong ETag, else its Last-Modified time,
    each with its length. None when the server gives neither."""
    length = response.headers.get("content-length", "")
    if etag := _strong_etag(response):
        return f"etag {etag} {length}"
    modified = response.headers.get("last-modified", "")
    return f"modified {modified} {length}" if modified and length else None


def _client(config: HttpConfig) -> httpx.Client:
    # No proxy from the environment (the address checks above are of the host itself), but
    # the CA bundle named by SSL_CERT_FILE is trusted, as by the providers' client.
    return httpx.Client(
        timeout=httpx.Timeout(config.timeout_seconds), follow_redirects=False, trust_env=False, verify=tls.verify()
    )


@contextmanager
def _answer(
    client: httpx.Client, method: str, url: str, config: HttpConfig, headers: dict[str, str] | None = None
) -> Iterator[httpx.Response]:
    """The server's answer to `method url` once redirects are followed by hand, each hop's
    host checked first (its body not read yet)."""
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        check_address(current, config.allow_private_addresses)
        with client.stream(method, current, headers=headers) as response:
            if not response.is_redirect:
                yield response
                return
            current = urljoin(current, response.headers.get("location", ""))
    raise RowError(f"Cannot fetch {shown(url)}: more than {MAX_REDIRECTS} redirects")


def _fetch_once(url: str, config: HttpConfig, max_bytes: int, sink: BinaryIO) -> str | None:
    deadline = time.monotonic() + config.timeout_seconds * 4
    sink.seek(0)
    sink.truncate()
    try:
        with _client(config) as client, _answer(client, "GET", url, config) as response:
            _body(response, url, max_bytes, deadline, sink)
            return version(response)
    except httpx.TimeoutException:
        raise Retryable(f"Cannot fetch {shown(url)}: no answer within {config.timeout_seconds:g} s") from None
    except httpx.TransportError as exc:
        why = f"Cannot fetch {shown(url)}: {network_reason(exc)}"
        lasting = isinstance(exc, httpx.ConnectError) and lasting_tls_failure(exc)
        raise (RowError(why) if lasting else Retryable(why)) from None


def _body(response: httpx.Response, url: str, max_bytes: int, deadline: float, sink: BinaryIO) -> None:
    status = response.status_code
    if status == 429 or status >= 500:
        raise Retryable(f"Cannot fetch {shown(url)}: the server answered HTTP {status}")
    if status >= 400:
        raise RowError(f"Cannot fetch {shown(url)}: the server answered HTTP {status}")
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise RowError(over_limit(f"input {shown(url)}", max_bytes, int(declared)))
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise RowError(over_limit(f"input {shown(url)}", max_bytes))
        if time.monotonic() > deadline:
            raise RowError(f"Cannot fetch {shown(url)}: the download took too long")
        sink.write(chunk)
    if size == 0:
        raise RowError(f"input {shown(url)} is empty (0 bytes)")
