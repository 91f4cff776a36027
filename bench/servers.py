"""The servers a bench talks to, each in its own process as it would be in use: S3 (moto)
and the provider (`soundpatch simulate`). Started on free loopback ports, stopped after."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
