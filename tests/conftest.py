from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import numpy as np
import pytest
import soundfile as sf

from soundpatch import demo_audio
from tests.jobs import SCRIPT, clean_env, seeded_prefect_home, synth


@pytest.fixture(scope="session")
def music_44k() -> np.ndarray:
    return demo_audio.music(20.0, 44100, channels=2, seed=1)


@pytest.fixture(scope="session")
def voice_16k() -> np.ndarray:
    return demo_audio.voice(20.0, 16000, seed=2)


@pytest.fixture
def library(tmp_path, aws_env):
    """The issue's mix: a 2.5 s mono 48 kHz effect, a 30 s stereo loop, a 4-minute FLAC,
    and an s3:// input (44.1 kHz stereo WAV, whole seconds: it can be shared as it is)."""
    s3 = aws_env
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "fx.wav", synth(2.5, 48000, 1), 48000, subtype="PCM_16")
    sf.write(audio / "loop.wav", synth(30.0, 44100, 2, 1), 44100, subtype="PCM_24")
    sf.write(audio / "tape.flac", synth(240.0, 22050, 1, 2), 22050, subtype="PCM_16")
    inputs = s3.bucket("inputs")
    buf = io.BytesIO()
    sf.write(buf, synth(8.0, 44100, 2, 3), 44100, format="WAV", subtype="PCM_16")
    s3.client.put_object(Bucket=inputs, Key="bank/door.wav", Body=buf.getvalue())
    (tmp_path / "mix.csv").write_text(
        "id,input,start,end,prompt,seed\n"
        "fx,audio/fx.wav,1.20,1.65,metal clang,11\n"
        "loop,audio/loop.wav,10.0,14.5,brass stab,222\n"
        "tape,audio/tape.flac,3:52.5,3:56,applause,333\n"
        "s3,s3://inputs/bank/door.wav,3.0,4.5,creaky door,444\n"
    )
    s3.bucket("stage")
    return tmp_path


# ------------------------------------------------------------------ real servers on loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    client: object  # boto3 S3 client pointed at it

    def bucket(self, name: str) -> str:
        try:
            self.client.create_bucket(Bucket=name)
        except self.client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        listing = self.client.list_objects_v2(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for o in listing.get("Contents", [])]


@contextmanager
def _moto(log_dir: Path, tls: tuple[Path, Path, Path] | None = None, **env: str) -> Iterator[S3Server]:
    """moto's S3-compatible server as its own process, speaking HTTP on loopback; with `tls`
    (certificate, key, the CA bundle that trusts it), https."""
    port = _free_port()
    script = Path(sys.executable).parent / "moto_server"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
    log = open(log_dir / "moto.log", "w")  # noqa: SIM115 - closed below
    speak_tls = ["-c", str(tls[0]), "-k", str(tls[1])] if tls else []
    proc = subprocess.Popen(
        [*cmd, "-H", "127.0.0.1", "-p", str(port), *speak_tls], stdout=log, stderr=log, env={**os.environ, **env}
    )
    endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("moto server did not start")
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
            verify=str(tls[2]) if tls else None,
        )
        yield S3Server(endpoint, client)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    with _moto(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def s3_server_checking_keys(tmp_path_factory) -> Iterator[S3Server]:
    """A second S3 server that checks credentials (as AWS does): unknown keys are refused."""
    with _moto(tmp_path_factory.mktemp("moto-auth"), INITIAL_NO_AUTH_ACTION_COUNT="0") as server:
        yield server


@pytest.fixture
def aws_env(monkeypatch, s3_server):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


@pytest.fixture
def simulator():
    """Start simulators (real HTTP on loopback) with the given settings; all stopped after."""
    from soundpatch.simulator import Simulator, SimulatorSettings

    started = []

    def start(**settings) -> Simulator:
        sim = Simulator(SimulatorSettings(**settings)).start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


@dataclass
class SimulatorProcess:
    base_url: str

    def stats(self) -> dict:
        return httpx.get(f"{self.base_url}/_sim/stats", timeout=10).json()


@pytest.fixture
def simulator_process():
    """Start `soundpatch simulate OPTIONS...` in a process of its own, as a provider is, not a
    thread of the test's: where timing is what is tested, the server does not wait on the
    test's threads for the interpreter lock before it counts a request. All stopped after."""
    started = []

    def start(*options: str) -> SimulatorProcess:
        port = _free_port()
        process = subprocess.Popen(
            [str(SCRIPT), "simulate", "--port", str(port), *options],
            stdout=subprocess.DEVNULL,
            env=clean_env(),
        )
        started.append(process)
        sim = SimulatorProcess(f"http://127.0.0.1:{port}")
        for _ in range(300):
            try:
                sim.stats()
                return sim
            except httpx.TransportError:
                assert process.poll() is None, "soundpatch simulate exited"
                time.sleep(0.05)
        raise AssertionError("soundpatch simulate did not answer in 15 s")

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def job_dir(tmp_path, aws_env):
    """A folder with a 3 s effect (fx.wav) and a staging bucket, for whole hosted jobs."""
    aws_env.bucket("stage")
    rate = 48000
    t = np.arange(int(3.0 * rate)) / rate
    sf.write(tmp_path / "fx.wav", (0.2 * np.sin(2 * np.pi * 150 * t))[:, None], rate, subtype="PCM_16")
    return tmp_path


class FaultProxy:
    """In front of the S3 server: `fault(method, path, authorized)` may answer a request with
    an S3 error (status, code) instead of forwarding it, as a real store does under load or
    with a policy that denies some writes. Everything else is passed through untouched."""

    def __init__(self, upstream: str, fault) -> None:
        import http.client
        import http.server
        import threading
        from urllib.parse import urlsplit

        target = urlsplit(upstream)

        self.faults = 0
        self.answers: list[tuple[str, str, int, int]] = []  # (method, path, status, body bytes) passed through
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                answer = fault(self.command, self.path, "Authorization" in self.headers)
                if answer is not None:
                    status, code = answer
                    proxy.faults += 1
                    xml = f"<Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    self.wfile.write(xml)
                    return
                # As sent: urllib would add a form Content-Type to a POST without one (S3's
                # DeleteObjects), and the server would then read its XML body as a form.
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=dict(self.headers.items()))
                    r = conn.getresponse()
                    status, headers, data = r.status, r.getheaders(), r.read()
                finally:
                    conn.close()
                proxy.answers.append((self.command, self.path, status, len(data)))
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        self.send_header(k, v)
                length = r.getheader("Content-Length") if self.command == "HEAD" else None  # the object's, to HEAD
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def served(self, method: str = "GET") -> int:
        """Bytes of the bodies the server sent back to `method` requests, so far."""
        return sum(size for m, _, _, size in list(self.answers) if m == method)

    @property
    def throttled(self) -> int:
        return self.faults

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def throttled_s3(aws_env):
    """A share of SDK requests answered with 503 SlowDown; presigned GETs (the provider's
    fetches, which carry no Authorization header) pass untouched."""
    import random

    rng = random.Random(1)
    proxy = FaultProxy(
        aws_env.endpoint, lambda method, path, signed: (503, "SlowDown") if signed and rng.random() < 0.15 else None
    )
    yield proxy
    proxy.stop()


@pytest.fixture
def fault_proxy(aws_env):
    """Start FaultProxy instances in front of the test S3 server; all stopped after."""
    started = []

    def start(fault):
        proxy = FaultProxy(aws_env.endpoint, fault)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@contextmanager
def prefect_server_process(home: Path, port: int | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`prefect server start` on loopback with its home in `home` (seeded if new), on `port`
    (default: a free one): its API URL and process (a test may stop it early, and start it
    again on the same port and home; it is stopped after in any case)."""
    port = port or _free_port()
    home = seeded_prefect_home(home)
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed below
    env = clean_env(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.Popen(
        [str(SCRIPT.parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        env=env,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the Prefect server did not start: " + (home / "server.log").read_text()[-2000:])
            time.sleep(0.3)
        yield api, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def prefect_server(tmp_path_factory):
    """`prefect server start` on loopback, as a team would run one for its workers."""
    with prefect_server_process(tmp_path_factory.mktemp("prefect-server")) as (api, _):
        yield api
