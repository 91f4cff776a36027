"""A local server speaking the Each Labs, Stability AI and fal protocols, backed by the
local engine.

Rehearse a big batch before spending money, and test against real HTTP:

    soundpatch simulate --port 8787 --latency 2 --rpm 120 --error-rate 0.05 --format mp3

Each Labs and fal: it accepts creates (a key required), fetches the clip from `audio_url`
like the real service, fills the masked seconds (with the local engine, or with a tone
whose frequency comes from the seed, so tests can check where the model's audio landed),
and serves the result after `latency` seconds. Stability AI: the clip comes with the call,
and the answer (the audio) after `latency` seconds. Knobs inject what real services do:
429s above a rate (with Retry-After), 5xx on create, predictions that fail, answers that
come too late, MP3 results (encoder delay), a deliberate shift, truncated downloads,
results withheld by a content filter. Routes: simulator_http.py."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from soundpatch import soundio
from soundpatch.audio import Audio
from soundpatch.providers.base import InpaintRequest
from soundpatch.providers.local import LocalEngine
from soundpatch.simulator_http import serve
from soundpatch.simulator_requests import check_prediction, check_stability_call

MAX_FETCH_BYTES = 128 * 1024 * 1024
OUT_OF_CREDIT = "Insufficient balance: add credit to your account to make more predictions"
MODERATED = (
    "Your request was flagged by our content moderation system, as a result your request was denied "
    "and you were not charged."
)


@dataclass
class SimulatorSettings:
    latency: float = 1.0  # seconds from create to success
    rpm: float | None = None  # creates per minute before 429s
    rate_window: float = 60.0  # seconds the rpm is counted over (shorter for quick tests)
    max_seconds: int = 190  # longest seconds_total accepted (a 400 beyond)
    error_rate: float = 0.0  # share of creates answered with a 5xx
    fail_rate: float = 0.0  # share of predictions that end `failed`
    truncate_rate: float = 0.0  # share of result downloads cut short
    # Share of result downloads that arrive whole (the right length) but damaged, as a
    # faulty cache or proxy can serve them: every byte zero, so they do not decode.
    corrupt_rate: float = 0.0
    poll_error_rate: float = 0.0  # share of polls answered with a 5xx
    # Share of polls answered 200 with a page that is not the API's JSON (a proxy's or a
    # gateway's error page, as services behind CDNs sometimes send) ...
    garbled_poll_rate: float = 0.0
    # ... and of Each Labs and fal creates made (billed once done) and answered so.
    garbled_create_rate: float = 0.0
    slow_create_rate: float = 0.0  # share of creates made but answered only after slow_create_seconds
    slow_create_seconds: float = 30.0
    filter_rate: float = 0.0  # Stability: share of results withheld (finish-reason CONTENT_FILTERED)
    # Stability: a prompt holding this word is refused by "content moderation" (403), as
    # Stability AI refuses a prompt it flags; nothing is made, nothing is billed.
    flagged_word: str | None = None
    timeout_after_429: float = 60.0  # Stability: seconds a key stays refused after a 429
    result_format: str = "wav"  # wav | mp3
    shift_ms: float = 0.0  # silence prepended to results (a misaligned model)
    fill: str = "local"  # local | tone
    price: float = 0.20
    # The account's credit in USD: each prediction made takes `price` of it, and once what is
    # left does not cover one, creates are refused as each service does (Each Labs and
    # Stability AI: 402; fal: 403, "User is locked. Reason: Exhausted balance"). None: no end.
    balance: float | None = None
    api_key: str | None = None  # None: any non-empty key is accepted
    seed: int = 0
    # Seconds a result stays downloadable after it is ready (real providers expire their
    # output URLs too): a long rehearsal's memory stays bounded.
    keep_results: float = 3600.0
    # Where results are said to be, as a CDN in front of a provider's storage serves them
    # (scheme://host:port); None: the simulator itself.
    results_url: str | None = None


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
    answer_now: bool = False  # answered once made, whatever the latency (Simulator.answer_now)
    account: str = ""  # the key that made it: another key is told there is no such prediction


@dataclass
class Stats:
    creates: int = 0
    accepted: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    garbled_polls: int = 0
    garbled_creates: int = 0
    polls: int = 0
    downloads: int = 0
    corrupted: int = 0  # downloads sent damaged (corrupt_rate)
    out_of_credit: int = 0  # creates refused because the balance did not cover them
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
        self._sync_billed = 0  # Stability-style calls answered (billed) so far
        self._charged = 0.0  # what predictions made took of settings.balance
        self._timed_out_until = 0.0  # Stability: a key that got a 429 is refused until then
        self._engine = LocalEngine()
        self._fetch = httpx.Client(timeout=30.0)
        self.server = serve(self, host, port)
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
        """Each Labs: POST /v1/prediction."""
        s = self.settings
        self._count_create()
        if not key or (s.api_key is not None and key != s.api_key):
            return 401, {"status": "error", "message": "Invalid or missing API key"}, {}
        error = check_prediction(body, s.max_seconds)
        if error:
            return 400, {"status": "error", "message": error}, {}
        with self._lock:
            turned_away = self._turn_away(time.monotonic())
            if turned_away:
                status, message, headers = turned_away
                return status, {"status": "error", "message": message}, headers
            if not self._charge():
                return 402, {"status": "error", "message": OUT_OF_CREDIT}, {}
            self._accept(body["input"]["audio_url"], body["input"]["prompt"])
            slow = bool(s.slow_create_rate and self._rng.random() < s.slow_create_rate)
            prediction = _Prediction(uuid.uuid4().hex, body["input"], time.monotonic(), account=key)
            prediction.ext = "mp3" if s.result_format == "mp3" else "wav"
            fails = bool(s.fail_rate and self._rng.random() < s.fail_rate)
            self._predictions[prediction.id] = prediction
        threading.Thread(target=self._run, args=(prediction, fails), daemon=True).start()
        if slow:  # made, and billed, but the answer comes too late for the client
            time.sleep(s.slow_create_seconds)
        return 200, {"status": "success", "message": "Prediction created", "predictionID": prediction.id}, {}

    def inpaint_now(
        self, key: str | None, fields: dict[str, str], clip: bytes | None
    ) -> tuple[int, bytes, str, dict[str, str]]:
        """Stability AI: POST /v2beta/audio/stable-audio-2/inpaint, answered with the audio
        itself once the "model" is done. (status, body, content type, headers)"""
        s = self.settings
        began = time.monotonic()
        self._count_create()

        def error(status: int, name: str, message: str, headers: dict[str, str] | None = None):
            body = json.dumps({"id": uuid.uuid4().hex, "name": name, "errors": [message]}).encode()
            return status, body, "application/json", headers or {}

        if not key or (s.api_key is not None and key != s.api_key):
            return error(401, "unauthorized", "authorization: missing or invalid API key")
        problem, spec, audio = check_stability_call(fields, clip, s.max_seconds)
        if problem:
            return error(400, "bad_request", problem)
        if s.flagged_word and s.flagged_word.lower() in str(spec.get("prompt", "")).lower():
            return error(403, "content_moderation", MODERATED)
        with self._lock:
            now = time.monotonic()
            if now < self._timed_out_until:  # as Stability does: no Retry-After, and a timeout
                self.stats.rate_limited += 1
                return error(429, "rate_limit_exceeded", "this key is timed out for exceeding the rate limit")
            turned_away = self._turn_away(now)
            if turned_away:
                status, message, headers = turned_away
                if status == 429:
                    self._timed_out_until = now + s.timeout_after_429
                    return error(429, "rate_limit_exceeded", f"{message}; timed out for {s.timeout_after_429:g} s")
                return error(status, "service_unavailable", message, headers)
            if s.fail_rate and self._rng.random() < s.fail_rate:
                return error(500, "internal_error", "the model could not process this input (simulated failure)")
            if not self._charge():
                return error(402, "payment_required", OUT_OF_CREDIT)
            self._accept("(uploaded)", spec["prompt"])
            slow = bool(s.slow_create_rate and self._rng.random() < s.slow_create_rate)
            filtered = bool(s.filter_rate and self._rng.random() < s.filter_rate)
        try:
            ext = "mp3" if "mp3" in (s.result_format, fields.get("output_format")) else "wav"
            result = self._generate(spec, audio, ext)
            time.sleep(max(0.0, s.latency - (time.monotonic() - began)))
            with self._lock:
                self._sync_billed += 1  # a generation that ran is billed, filtered or not
        finally:
            with self._lock:
                self.stats.in_flight -= 1
        if slow:
            time.sleep(s.slow_create_seconds)
        headers = {"finish-reason": "CONTENT_FILTERED" if filtered else "SUCCESS", "seed": str(spec.get("seed", 0))}
        return 200, result, "audio/mpeg" if ext == "mp3" else "audio/wav", headers

    def _count_create(self) -> None:
        with self._lock:
            self._expire(time.monotonic())
            self.stats.creates += 1
            self.stats.create_times.append(time.time())

    def _turn_away(self, now: float) -> tuple[int, str, dict[str, str]] | None:
        """(status, message, headers) for a create refused by the rate limit or an injected
        5xx (under the lock); None lets it through and counts it toward the rate."""
        s = self.settings
        if s.rpm:
            allowed = s.rpm * s.rate_window / 60.0
            while self._recent and now - self._recent[0] >= s.rate_window:
                self._recent.popleft()
            if len(self._recent) >= allowed:
                self.stats.rate_limited += 1
                retry = max(0.05, s.rate_window - (now - self._recent[0]))
                return 429, "Rate limit exceeded", {"Retry-After": f"{retry:.2f}"}
        if s.error_rate and self._rng.random() < s.error_rate:
            self.stats.server_errors += 1
            return 503, "Service temporarily unavailable", {}
        self._recent.append(now)
        return None

    def _charge(self) -> bool:
        """Whether the account's balance covers one more prediction, then taken from it
        (under the lock)."""
        s = self.settings
        if s.balance is not None and self._charged + s.price > s.balance + 1e-9:
            self.stats.out_of_credit += 1
            return False
        self._charged += s.price
        return True

    def top_up(self, usd: float) -> None:
        """Credit added to the account (settings.balance)."""
        with self._lock:
            self.settings.balance = (self.settings.balance or 0.0) + usd

    def _accept(self, audio: str, prompt: Any) -> None:
        """A prediction is made (under the lock)."""
        self.stats.accepted += 1
        self.stats.accepted_times.append(time.time())
        self.stats.audio_urls.append(audio)
        self.stats.prompts.append(str(prompt))
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)

    def garbled(self, what: str) -> bool:
        """Whether this `what` ("poll" or "create") is answered with a page that is not JSON."""
        rate = getattr(self.settings, f"garbled_{what}_rate")
        with self._lock:
            garbled = bool(rate and self._rng.random() < rate)
            setattr(self.stats, f"garbled_{what}s", getattr(self.stats, f"garbled_{what}s") + garbled)
        return garbled

    def get(self, key: str | None, prediction_id: str) -> tuple[int, dict[str, Any]]:
        if not key:
            return 401, {"status": "error", "message": "Invalid or missing API key"}
        with self._lock:
            self.stats.polls += 1
            p = self._predictions.get(prediction_id)
            if self.settings.poll_error_rate and self._rng.random() < self.settings.poll_error_rate:
                return 502, {"status": "error", "message": "Bad gateway"}
        if p is None or p.account != key:  # as a service shows each account its own
            return 404, {"status": "error", "message": "Prediction not found"}
        waited = time.monotonic() - p.created
        status = p.status
        if status == "success" and not self._shown_done(p):
            status = "processing"
        body: dict[str, Any] = {
            "id": p.id,
            "status": status,
            "input": p.input,
            "output": f"{self.settings.results_url or self.base_url}/files/{p.id}.{p.ext}"
            if status == "success"
            else None,
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
            visibly_done = p.status == "failed" or (p.status == "success" and self._shown_done(p))
            if not visibly_done:
                p.status = "cancelled"
        return 200, {"status": "success", "message": "Prediction cancelled"}

    def _shown_done(self, p: _Prediction) -> bool:
        """Whether a prediction the "model" has made is shown as done yet."""
        return p.answer_now or time.monotonic() - p.created >= self.settings.latency

    def answer_now(self) -> int:
        """The predictions made so far are answered at their next poll once the "model" has
        made them, whatever `settings.latency`; a long latency still holds the ones made
        after. A test's way to let the first prediction through and hold the next one exactly
        where it wants, with no race against the client. Returns how many there were."""
        with self._lock:
            for p in self._predictions.values():
                p.answer_now = True
            return len(self._predictions)

    def file(self, name: str) -> tuple[int, bytes, int]:
        """(status, bytes to send, length to announce): a truncated download announces more."""
        prediction_id = name.rsplit(".", 1)[0]
        with self._lock:
            self.stats.downloads += 1
            p = self._predictions.get(prediction_id)
            truncate = bool(self.settings.truncate_rate and self._rng.random() < self.settings.truncate_rate)
            corrupt = bool(self.settings.corrupt_rate and self._rng.random() < self.settings.corrupt_rate)
        if p is None or p.result is None:
            return 404, b"not found", 9  # never made, or expired
        with self._lock:
            if not p.fetched:
                p.fetched = True
                self.stats.in_flight -= 1
        if truncate:
            return 200, p.result[: len(p.result) // 2], len(p.result)
        if corrupt:
            with self._lock:
                self.stats.corrupted += 1
            return 200, bytes(len(p.result)), len(p.result)
        return 200, p.result, len(p.result)

    def billed(self) -> float:
        """What this "provider" has charged: every prediction that succeeded."""
        with self._lock:
            made = sum(1 for p in self._predictions.values() if p.status == "success") + self._sync_billed
            return self.settings.price * made

    # ------------------------------------------------------------------ the "model"

    def _run(self, p: _Prediction, fails: bool) -> None:
        try:
            if fails:
                raise RuntimeError("the model could not process this input (simulated failure)")
            p.status = "processing"
            result = self._generate(p.input, self._fetch_clip(p.input["audio_url"]), p.ext)
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

    def _fetch_clip(self, url: str) -> bytes:
        response = self._fetch.get(url)
        if response.status_code != 200:
            raise RuntimeError(f"could not fetch audio_url: HTTP {response.status_code}")
        if len(response.content) > MAX_FETCH_BYTES:
            raise RuntimeError("audio_url is too large")
        return response.content

    def _generate(self, spec: dict[str, Any], data: bytes, ext: str) -> bytes:
        clip, rate = soundio.read(data, dtype="float32", always_2d=True)
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
        if ext == "mp3":
            return soundio.write(out, rate, "MP3", "MPEG_LAYER_III")
        return soundio.write(out, rate, "WAV", "PCM_16")


def tone_for_seed(seed: Any, rate: int, a: int, b: int) -> np.ndarray:
    """What the tone "model" writes into [a, b): a sine whose pitch names the seed, in phase
    with the clip's own timeline, so a test can predict every sample of the result."""
    freq = 300.0 + (int(seed or 0) % 700)
    t = np.arange(a, b) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
