"""The servers a bench talks to, each in its own process as it would be in use: S3 (moto)
and the provider (`soundpatch simulate`). Started on free loopback ports, stopped after.
And a link in front of S3 passing answers on at a network's pace, counting them."""

from __future__ import annotations

import http.client
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_credentials() -> dict[str, str]:
    """Made-up AWS credentials for the S3 server (moto takes any), set in this process too:
    the environment a bench's `soundpatch` commands get."""
    made_up = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(made_up)
    return dict(os.environ)


@contextmanager
def s3_server(bucket: str) -> Iterator[str]:
    """An S3-compatible endpoint URL with `bucket` made (AWS_* credentials: any values)."""
    port = free_port()
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        for _ in range(100):
            try:
                s3.create_bucket(Bucket=bucket)
                break
            except Exception:
                time.sleep(0.1)
        yield endpoint
    finally:
        moto.terminate()
        moto.wait()


@contextmanager
def simulator(*options: str) -> Iterator[str]:
    """The base URL of `soundpatch simulate OPTIONS...`, once it answers."""
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "soundpatch"), "simulate", "--port", str(port), *options],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client() as client:
            for _ in range(200):
                try:
                    client.get(f"{url}/_sim/stats")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait()


class Meter:
    """What a metered link passed on: bytes of answers' bodies, and requests."""

    def __init__(self) -> None:
        self.bytes = 0
        self.requests = 0
        self.lock = threading.Lock()


@contextmanager
def metered_link(upstream: str, mb_per_second: float, latency_ms: float = 0.0) -> Iterator[tuple[str, Meter]]:
    """An endpoint in front of `upstream` (an S3 server) answering each request `latency_ms`
    late and passing its body on at `mb_per_second` a connection, as a network does
    (loopback passes gigabytes a second, at once), counting what it passed: (its URL, its Meter)."""
    target = urlsplit(upstream)
    meter = Meter()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            time.sleep(latency_ms / 1000)
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
            try:
                conn.request(self.command, self.path, body=body or None, headers=dict(self.headers.items()))
                answer = conn.getresponse()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "date", "server"):
                        self.send_header(key, value)
                self.end_headers()
                with meter.lock:
                    meter.requests += 1
                started, sent = time.monotonic(), 0
                while self.command != "HEAD" and (chunk := answer.read(1 << 16)):
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    with meter.lock:
                        meter.bytes += len(chunk)
                    ahead = sent / (mb_per_second * 1e6) - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client had what it wanted
            finally:
                conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 128  # (5 by default: connections opened at once were dropped, retried 1 s later)

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", meter
    finally:
        server.shutdown()
        server.server_close()
