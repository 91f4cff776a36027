"""A local server that speaks the Each Labs prediction protocol, backed by the local engine.

Rehearse a big batch before spending money, and test against real HTTP:

    soundpatch simulate --port 8787 --latency 2 --rpm 120 --error-rate 0.05 --format mp3

It accepts creates (X-API-Key required), fetches the clip from `audio_url` like the
real service, fills the masked seconds (with the local engine, or with a tone whose
frequency comes from the seed, so tests can check where the model's audio landed), and
serves the result after `latency` seconds. Knobs inject what real services do: 429s
above a rate (with Retry-After), 5xx on create, predictions that fail, MP3 results
(encoder delay), a deliberate shift, truncated downloads.
"""

from __future__ import annotations

import json
import random
import re
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np

from soundpatch import soundio
from soundpatch.audio import Audio
from soundpatch.providers.base import InpaintRequest
from soundpatch.providers.local import LocalEngine

MODEL = "stable-audio-2-5-inpaint"
MAX_FETCH_BYTES = 128 * 1024 * 1024


@dataclass
class SimulatorSettings:
    latency: float = 1.0  # seconds from create to success
    rpm: float | None = None  # creates per minute before 429s
    rate_window: float = 60.0  # seconds the rpm is counted over (shorter for quick tests)
    max_seconds: int = 190  # longest seconds_total accepted (a 400 beyond)
    error_rate: float = 0.0  # share of creates answered with a 5xx
    fail_rate: float = 0.0  # share of predictions that end `failed`
    truncate_rate: float = 0.0  # share of result downloads cut short
    poll_error_rate: float = 0.0  # share of polls answered with a 5xx
    slow_create_rate: float = 0.0  # share of creates made but answered only after slow_create_seconds
    slow_create_seconds: float = 30.0
    result_format: str = "wav"  # wav | mp3
    shift_ms: float = 0.0  # silence prepended to results (a misaligned model)
    fill: str = "local"  # local | tone
    price: float = 0.20
    api_key: str | None = None  # None: any non-empty key is accepted
    seed: int = 0
    # Seconds a result stays downloadable after it is ready (real providers expire their
    # output URLs too): a long rehearsal's memory stays bounded.
    keep_results: float = 3600.0


@dataclass
class _Prediction:
    id: str
    input: dict[str, Any]
    created: float
    status: str = "starting"
    error: str | None = None
    result: bytes | None = None
    ext: str = "wav"
    fetched: bool = False  # its result was downloaded at least once


@dataclass
class Stats:
    creates: int = 0
    accepted: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    polls: int = 0
    downloads: int = 0
    create_times: list[float] = field(default_factory=list)
    accepted_times: list[float] = field(default_factory=list)
    audio_urls: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # one per prediction made
    in_flight: int = 0  # predictions created whose result has not been downloaded yet
    max_in_flight: int = 0  # the most there ever were at once


class Simulator:
    def __init__(self, settings: SimulatorSettings | None = None, host: str = "127.0.0.1", port: int = 0):
        self.settings = settings or SimulatorSettings()
        self.stats = Stats()
        self._predictions: dict[str, _Prediction] = {}
        self._recent: deque[float] = deque()
        self._expiring: deque[tuple[float, _Prediction]] = deque()  # (when its result goes, prediction)
        self._lock = threading.Lock()
        self._rng = random.Random(self.settings.seed)
        self._engine = LocalEngine()
        self._fetch = httpx.Client(timeout=30.0)
        self.server = _Server((host, port), _handler(self))
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Simulator:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._fetch.close()

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ protocol

    def create(self, key: str | None, body: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        s = self.settings
        with self._lock:
            self._expire(time.monotonic())
            self.stats.creates += 1
            self.stats.create_times.append(time.time())
        if not key or (s.api_key is not None and key != s.api_key):
            return 401, {"status": "error", "message": "Invalid or missing API key"}, {}
        error = _validate(body, s.max_seconds)
        if error:
            return 400, {"status": "error", "message": error}, {}
        with self._lock:
            now = time.monotonic()
            if s.rpm:
                allowed = s.rpm * s.rate_window / 60.0
                while self._recent and now - self._recent[0] >= s.rate_window:
                    self._recent.popleft()
                if len(self._recent) >= allowed:
                    self.stats.rate_limited += 1
                    retry = max(0.05, s.rate_window - (now - self._recent[0]))
                    return 429, {"status": "error", "message": "Rate limit exceeded"}, {"Retry-After": f"{retry:.2f}"}
            if s.error_rate and self._rng.random() < s.error_rate:
                self.stats.server_errors += 1
                return 503, {"status": "error", "message": "Service temporarily unavailable"}, {}
            self._recent.append(now)
            self.stats.accepted += 1
            self.stats.accepted_times.append(time.time())
            self.stats.audio_urls.append(body["input"]["audio_url"])
            self.stats.prompts.append(str(body["input"]["prompt"]))
            slow = bool(s.slow_create_rate and self._rng.random() < s.slow_create_rate)
            prediction = _Prediction(uuid.uuid4().hex, body["input"], time.monotonic())
            prediction.ext = "mp3" if s.result_format == "mp3" else "wav"
            fails = bool(s.fail_rate and self._rng.random() < s.fail_rate)
            self._predictions[prediction.id] = prediction
            self.stats.in_flight += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        threading.Thread(target=self._run, args=(prediction, fails), daemon=True).start()
        if slow:  # made, and billed, but the answer comes too late for the client
            time.sleep(s.slow_create_seconds)
        return 200, {"status": "success", "message": "Prediction created", "predictionID": prediction.id}, {}

    def get(self, key: str | None, prediction_id: str) -> tuple[int, dict[str, Any]]:
        if not key:
            return 401, {"status": "error", "message": "Invalid or missing API key"}
        with self._lock:
            self.stats.polls += 1
            p = self._predictions.get(prediction_id)
            if self.settings.poll_error_rate and self._rng.random() < self.settings.poll_error_rate:
                return 502, {"status": "error", "message": "Bad gateway"}
        if p is None:
            return 404, {"status": "error", "message": "Prediction not found"}
        waited = time.monotonic() - p.created
        status = p.status
        if status == "success" and waited < self.settings.latency:
            status = "processing"
        body: dict[str, Any] = {
            "id": p.id,
            "status": status,
            "input": p.input,
            "output": f"{self.base_url}/files/{p.id}.{p.ext}" if status == "success" else None,
            "metrics": {
                "predict_time": round(min(waited, self.settings.latency), 3),
                "cost": self.settings.price if status in ("success", "failed") else None,
            },
            "urls": {
                "get": f"{self.base_url}/v1/prediction/{p.id}",
                "cancel": f"{self.base_url}/v1/prediction/{p.id}/cancel",
            },
        }
        if status == "failed":
            body["error"] = p.error
            body["metrics"]["cost"] = 0.0  # a failed prediction is not billed
        return 200, body

    def cancel(self, prediction_id: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            p = self._predictions.get(prediction_id)
            if p is None:
                return 404, {"status": "error", "message": "Prediction not found"}
            visibly_done = p.status == "failed" or (
                p.status == "success" and time.monotonic() - p.created >= self.settings.latency
            )
            if not visibly_done:
                p.status = "cancelled"
        return 200, {"status": "success", "message": "Prediction cancelled"}

    def file(self, name: str) -> tuple[int, bytes, int]:
        """(status, bytes to send, length to announce): a truncated download announces more."""
        prediction_id = name.rsplit(".", 1)[0]
        with self._lock:
            self.stats.downloads += 1
            p = self._predictions.get(prediction_id)
            truncate = bool(self.settings.truncate_rate and self._rng.random() < self.settings.truncate_rate)
        if p is None or p.result is None:
            return 404, b"not found", 9  # never made, or expired
        with self._lock:
            if not p.fetched:
                p.fetched = True
                self.stats.in_flight -= 1
        if truncate:
            return 200, p.result[: len(p.result) // 2], len(p.result)
        return 200, p.result, len(p.result)

    def billed(self) -> float:
        """What this "provider" has charged: every prediction that succeeded."""
        with self._lock:
            return self.settings.price * sum(1 for p in self._predictions.values() if p.status == "success")

    # ------------------------------------------------------------------ the "model"

    def _run(self, p: _Prediction, fails: bool) -> None:
        try:
            if fails:
                raise RuntimeError("the model could not process this input (simulated failure)")
            p.status = "processing"
            result = self._generate(p.input)
            with self._lock:
                if p.status == "processing":  # not cancelled meanwhile
                    p.result, p.status = result, "success"
                    self._expiring.append((time.monotonic() + self.settings.keep_results, p))
        except Exception as exc:  # the simulated service reports, it does not crash
            p.error = str(exc)
            p.status = "failed"

    def _expire(self, now: float) -> None:
        """Drop results past their time (under the lock); the predictions stay, results go."""
        while self._expiring and self._expiring[0][0] <= now:
            self._expiring.popleft()[1].result = None

    def _generate(self, spec: dict[str, Any]) -> bytes:
        response = self._fetch.get(spec["audio_url"])
        if response.status_code != 200:
            raise RuntimeError(f"could not fetch audio_url: HTTP {response.status_code}")
        if len(response.content) > MAX_FETCH_BYTES:
            raise RuntimeError("audio_url is too large")
        clip, rate = soundio.read(response.content, dtype="float32", always_2d=True)
        total = int(spec["seconds_total"])
        length = total * rate
        clip = np.concatenate([clip, np.zeros((max(0, length - len(clip)), clip.shape[1]), np.float32)])[:length]
        a, b = int(spec["mask_start"]) * rate, min(length, int(spec["mask_end"]) * rate)
        if self.settings.fill == "tone":
            out = clip.copy()
            out[a:b] = tone_for_seed(spec.get("seed"), rate, a, b)[:, None]
        else:
            request = InpaintRequest(Audio(clip, rate, "WAV", "FLOAT"), a, b, spec["prompt"], spec.get("seed"))
            out = clip.copy()
            out[a:b] = self._engine.inpaint(request).fill
        shift = int(self.settings.shift_ms / 1000 * rate)
        if shift:
            out = np.concatenate([np.zeros((shift, out.shape[1]), np.float32), out])[:length]
        if self.settings.result_format == "mp3":
            return soundio.write(out, rate, "MP3", "MPEG_LAYER_III")
        return soundio.write(out, rate, "WAV", "PCM_16")


class _Server(ThreadingHTTPServer):
    # A batch opens dozens of connections at once; the default backlog of 5 resets some.
    request_queue_size = 256
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that go away mid-answer (killed runs, timeouts) are part of the job.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


def tone_for_seed(seed: Any, rate: int, a: int, b: int) -> np.ndarray:
    """What the tone "model" writes into [a, b): a sine whose pitch names the seed, in phase
    with the clip's own timeline, so a test can predict every sample of the result."""
    freq = 300.0 + (int(seed or 0) % 700)
    t = np.arange(a, b) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _validate(body: Any, max_seconds: int = 190) -> str | None:
    if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
        return "Body must be a JSON object with 'model' and 'input'"
    if body.get("model") != MODEL:
        return f"Unknown model {body.get('model')!r}"
    spec = body["input"]
    for key in ("prompt", "audio_url", "mask_start", "mask_end", "seconds_total"):
        if key not in spec:
            return f"input.{key} is required"
    if not all(isinstance(spec[k], int) for k in ("mask_start", "mask_end", "seconds_total")):
        return "mask_start, mask_end and seconds_total must be integers"
    if not 6 <= spec["seconds_total"] <= max_seconds:
        return f"seconds_total must be between 6 and {max_seconds}"
    if not 0 <= spec["mask_start"] < spec["mask_end"] <= spec["seconds_total"]:
        return "mask must satisfy 0 <= mask_start < mask_end <= seconds_total"
    steps = spec.get("num_inference_steps")
    if steps is not None and not 4 <= steps <= 8:
        return "num_inference_steps must be between 4 and 8"
    return None


def _handler(sim: Simulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; with Nagle's algorithm on, the body waits
        # for the client's delayed ACK of the headers: 40 ms on every answer of a kept-alive
        # connection, which a real provider's server does not add.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
            pass  # quiet: the stats endpoint tells what happened

        def _send(
            self,
            status: int,
            body: bytes,
            content_type: str,
            headers: dict[str, str] | None = None,
            announce: int | None = None,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body) if announce is None else announce))
            if announce is not None and announce > len(body):
                self.close_connection = True
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(data).encode(), "application/json", headers)

        def do_POST(self) -> None:  # noqa: N802 - stdlib's name
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            key = self.headers.get("X-API-Key")
            if self.path.rstrip("/") == "/v1/prediction":
                try:
                    body = json.loads(raw or b"null")
                except json.JSONDecodeError:
                    return self._json(400, {"status": "error", "message": "Body is not JSON"})
                status, data, headers = sim.create(key, body)
                return self._json(status, data, headers)
            m = re.fullmatch(r"/v1/prediction/([0-9a-f]+)/cancel", self.path)
            if m:
                return self._json(*sim.cancel(m.group(1)))
            self._json(404, {"status": "error", "message": "Not found"})

        def do_GET(self) -> None:  # noqa: N802 - stdlib's name
            m = re.fullmatch(r"/v1/prediction/([0-9a-f]+)", self.path)
            if m:
                return self._json(*sim.get(self.headers.get("X-API-Key"), m.group(1)))
            m = re.fullmatch(r"/files/([0-9a-f]+\.(?:wav|mp3))", self.path)
            if m:
                status, data, announce = sim.file(m.group(1))
                content_type = "audio/mpeg" if m.group(1).endswith(".mp3") else "audio/wav"
                return self._send(status, data, content_type, announce=announce)
            if self.path in ("/_sim/stats", "/_sim/stats?times=1"):
                s = sim.stats
                stats = {
                    "creates": s.creates,
                    "accepted": s.accepted,
                    "rate_limited": s.rate_limited,
                    "server_errors": s.server_errors,
                    "polls": s.polls,
                    "downloads": s.downloads,
                    "max_in_flight": s.max_in_flight,
                }
                if self.path.endswith("?times=1"):  # when each create was accepted (Unix seconds)
                    stats["accepted_times"] = list(s.accepted_times)
                return self._json(200, stats)
            self._json(404, {"status": "error", "message": "Not found"})

    return Handler
