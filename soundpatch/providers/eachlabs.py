"""Stable Audio 2.5 Inpaint through the Each Labs prediction API: create, poll, download.

    POST {base}/v1/prediction        {"model", "version", "input": {...}} -> {"predictionID"}
    GET  {base}/v1/prediction/{id}   -> {"status", "output", "metrics": {"cost"}, "urls"}

Money rules, in this order of precedence:
- a create that was refused (4xx, 429) or never left the machine (connection refused)
  cost nothing and, for 429 and 5xx, is retried with backoff;
- a create whose answer never arrived is in doubt: it is not resent, and its price stays
  spent (the journal shows it);
- once a prediction id is known it is only ever polled, never created again.
The API key travels in the X-API-Key header only; it is redacted from every message.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import soundfile as sf

from soundpatch import soundio
from soundpatch.audio import Audio, pcm16
from soundpatch.config import ProviderConfig
from soundpatch.cpu import crunching
from soundpatch.errors import ConfigError, RowError
from soundpatch.limits import InFlight, RateLimiter
from soundpatch.providers.base import InpaintRequest, NotStarted, Prediction, PredictionFailed
from soundpatch.retry import Retryable, RetryPolicy
from soundpatch.staging import StagedClip, Staging
from soundpatch.window import MODEL_RATE, plan_window, prepare_clip, recover_region

MODEL = "stable-audio-2-5-inpaint"
VERSION = "0.0.1"
STEPS_RANGE = (4, 8)
MAX_RESULT_BYTES = 256 * 1024 * 1024  # a 190 s stereo float WAV is ~67 MB
TERMINAL_FAILURES = ("failed", "cancelled", "canceled", "error")


class EachLabs:
    name = "eachlabs"
    model = f"{MODEL}@{VERSION}"
    display = "Each Labs"
    uses_prompt = True

    def __init__(
        self,
        config: ProviderConfig,
        staging: Staging | None,
        client: httpx.Client | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        sleep=time.sleep,
        creates: RateLimiter | None = None,
        polls: RateLimiter | None = None,
        in_flight: InFlight | None = None,
    ) -> None:
        # Shared by every task of the process: a 429 slows them all.
        self.creates = creates or RateLimiter(60)
        self.polls = polls or RateLimiter(600)
        self.in_flight = in_flight or InFlight(concurrency)
        self.config = config
        self.price_usd = config.price
        self.staging = staging
        self.base_url = config.base_url.rstrip("/")
        self._api_key = api_key if api_key is not None else os.environ.get(config.api_key_env, "")
        timeout = httpx.Timeout(config.timeout_seconds, connect=10.0)
        # Pool sized to the work in flight (polls, and creates and downloads of rows on
        # either side of it): a much larger pool costs CPU in bookkeeping.
        limits = httpx.Limits(max_connections=2 * concurrency + 4, max_keepalive_connections=2 * concurrency + 4)
        self.client = client or httpx.Client(timeout=timeout, limits=limits)
        self.retry = RetryPolicy(attempts=config.max_retries + 1)
        self._sleep = sleep

    # ------------------------------------------------------------------ before money

    def ready(self) -> None:
        if not self._api_key and not self.config.api_key_secret:
            raise ConfigError(
                f"The {self.name} provider needs an API key: set the environment variable "
                f"{self.config.api_key_env} (provider.api_key_env names it)."
            )
        if self.staging is None:
            raise ConfigError(f"The {self.name} provider needs storage.staging (an s3:// prefix).")
        self.staging.ready()

    def check(
        self, audio_frames: int, rate: int, a: int, b: int, steps: int | None, guidance_scale: float | None
    ) -> None:
        plan_window(audio_frames, rate, a, b, self.config.context_seconds)
        if steps is not None and not STEPS_RANGE[0] <= steps <= STEPS_RANGE[1]:
            raise RowError(f"steps {steps} is outside {STEPS_RANGE[0]}..{STEPS_RANGE[1]} for {MODEL}")

    # ------------------------------------------------------------------ the call

    def inpaint(self, request: InpaintRequest) -> Prediction:
        audio = request.audio
        with crunching():
            window = plan_window(audio.frames, audio.rate, request.a, request.b, self.config.context_seconds)
            clip = prepare_clip(audio, window, self.config.pad)
        assert self.staging is not None
        staged = None
        try:
            if not request.resume_prediction_id:
                staged = self._stage(request, audio, window, clip)
            with self.in_flight.slot():  # from the create until the result is fetched
                if request.resume_prediction_id:
                    prediction_id, attempts = request.resume_prediction_id, 0
                else:
                    assert staged is not None
                    request.check_may_start()
                    body = {"model": MODEL, "version": VERSION, "input": self._input(request, window, staged.url)}
                    prediction_id, attempts = self._create(body, request)
                    request.tell("created", prediction_id=prediction_id)
                done = self._wait(prediction_id, request)
                cost = self._cost(done)
                # From here on the prediction is paid for: whatever fails keeps its cost.
                with _paid(cost, prediction_id, attempts):
                    data = self._download(done.get("output"), request)
            with _paid(cost, prediction_id, attempts), crunching():
                result, result_rate = _decode(data)
                fill, offset = recover_region(result, result_rate, clip, window, audio, request.a, request.b)
        finally:
            if staged is not None:
                self.staging.remove(staged)
                if staged.uri is not None:
                    request.tell("unstaged", uri=str(staged.uri))
        method = (
            f"{MODEL} (window {window.offset_seconds:.2f}+{window.seconds_total} s, "
            f"mask {window.mask_start}-{window.mask_end} s, aligned {offset} samples)"
        )
        return Prediction(
            fill=fill,
            cost_usd=cost,
            crossfade=None,
            prediction_id=prediction_id,
            attempts=attempts,
            method=method,
            offset_ms=offset / MODEL_RATE * 1000,
        )

    def _stage(self, request: InpaintRequest, audio: Audio, window, clip) -> StagedClip:
        as_is = (
            request.source is not None
            and request.source.startswith("s3://")
            and request.source.lower().endswith(".wav")
            and window.lo == 0
            and window.hi == audio.frames
            and window.pad == 0
            and audio.rate == MODEL_RATE
            and audio.channels == 2
        )
        assert self.staging is not None
        if as_is:
            return self.staging.share(request.source)
        with crunching():
            wav = soundio.write(pcm16(clip), MODEL_RATE, "WAV", "PCM_16")
        staged = self.staging.stage(wav, f"{request.name}.wav")
        request.tell("staged", uri=str(staged.uri))
        return staged

    def _input(self, request: InpaintRequest, window, url: str) -> dict[str, Any]:
        model_input: dict[str, Any] = {
            "prompt": request.prompt,
            "audio_url": url,
            "mask_start": window.mask_start,
            "mask_end": window.mask_end,
            "seconds_total": window.seconds_total,
        }
        if request.seed is not None:
            model_input["seed"] = request.seed
        if request.steps is not None:
            model_input["num_inference_steps"] = request.steps
        if request.guidance_scale is not None:
            model_input["guidance_scale"] = request.guidance_scale
        return model_input

    def _headers(self) -> dict[str, str]:
        return {"X-API-Key": self._api_key, "Content-Type": "application/json"}

    def _create(self, body: dict[str, Any], request: InpaintRequest) -> tuple[str, int]:
        attempts = 0

        def once() -> str:
            nonlocal attempts
            attempts += 1
            # A run stopped while this row waits its turn ends the wait; then nothing is sent.
            self.creates.acquire(give_up=request.stopping)
            request.check_may_start()
            # Journaled before the request goes out: if we die now, the row is "in doubt".
            request.tell("creating", attempt=attempts)
            try:
                response = self.client.post(f"{self.base_url}/v1/prediction", json=body, headers=self._headers())
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                request.tell("create_refused", reason=type(exc).__name__)
                raise Retryable(f"cannot connect to {self.base_url} ({type(exc).__name__})") from None
            except httpx.HTTPError as exc:
                # The request may have reached the provider: a prediction may exist.
                raise PredictionFailed(
                    f"The create request to {self.display} got no answer ({type(exc).__name__}); it may have "
                    "been created, so it is counted as spent and not sent again",
                    self.price_usd,
                    None,
                    attempts,
                ) from None
            if response.status_code >= 400:
                request.tell("create_refused", status=response.status_code)
            if response.status_code == 429:
                self.creates.throttled(_retry_after(response))
            elif response.status_code < 400:
                self.creates.succeeded()
            self._raise_for_status(response, "create")
            data = _json(response)
            prediction_id = data.get("predictionID") or data.get("id")
            if not prediction_id:
                raise PredictionFailed(
                    f"{self.display} accepted the create but returned no prediction id: "
                    f"{self._redact(response.text)[:200]}",
                    self.price_usd,
                    None,
                    attempts,
                )
            return str(prediction_id)

        try:
            prediction_id = self.retry.call(once, on_retry=self._on_retry(request, "create"), sleep=self._sleep)
        except Retryable as exc:
            # 429, 5xx and refused connections: no prediction was made, nothing is owed.
            raise PredictionFailed(
                f"{self.display} did not take the create after {attempts} attempts: {exc}", 0.0, None, attempts
            ) from None
        except (PredictionFailed, NotStarted):
            raise
        except RowError as exc:  # refused (4xx): nothing was made, nothing is owed
            raise PredictionFailed(str(exc), 0.0, None, attempts) from None
        return prediction_id, attempts

    def _wait(self, prediction_id: str, request: InpaintRequest) -> dict[str, Any]:
        """Poll until the prediction ends; polls are free, so transient errors just wait."""
        deadline = time.monotonic() + self.config.deadline_seconds
        interval = self.config.poll_seconds
        url = f"{self.base_url}/v1/prediction/{prediction_id}"
        last: dict[str, Any] = {}
        while True:
            wait = interval
            self.polls.acquire()
            try:
                response = self.client.get(url, headers=self._headers())
            except httpx.HTTPError as exc:
                request.tell("poll_retry", error=type(exc).__name__)
                response = None
            if response is not None and (response.status_code == 429 or response.status_code >= 500):
                request.tell("poll_retry", status=response.status_code)
                if response.status_code == 429:
                    self.polls.throttled(_retry_after(response))
                wait = max(interval, _retry_after(response) or 0.0)
            elif response is not None and response.status_code >= 400:
                raise PredictionFailed(
                    f"Polling prediction {prediction_id} failed: HTTP {response.status_code} {self._message(response)}",
                    self.price_usd,
                    prediction_id,
                )
            elif response is not None:
                last = _json(response)
                status = str(last.get("status", "")).lower()
                if status in ("success", "succeeded", "completed"):
                    return last
                if status in TERMINAL_FAILURES:
                    reason = self._redact(str(last.get("error") or last.get("logs") or status))[:300]
                    raise PredictionFailed(
                        f"{self.display} reports prediction {prediction_id} {status}: {reason}",
                        self._cost(last, default=self.price_usd),
                        prediction_id,
                    )
            if request.should_cancel is not None and request.should_cancel():
                self._cancel(prediction_id, last)
                raise PredictionFailed(
                    f"Prediction {prediction_id} was cancelled because the run was interrupted",
                    self._cost(last, default=self.price_usd),
                    prediction_id,
                )
            if time.monotonic() + wait > deadline:
                self._cancel(prediction_id, last)
                raise PredictionFailed(
                    f"Prediction {prediction_id} was not done after {self.config.deadline_seconds:g} s; "
                    "it was cancelled",
                    self.price_usd,
                    prediction_id,
                )
            self._sleep(wait)
            interval = min(interval * 1.5, self.config.max_poll_seconds)

    def _cancel(self, prediction_id: str, last: dict[str, Any]) -> None:
        url = (last.get("urls") or {}).get("cancel") or f"{self.base_url}/v1/prediction/{prediction_id}/cancel"
        try:
            self.client.post(url, headers=self._headers())
        except httpx.HTTPError:
            pass

    def _download(self, url: Any, request: InpaintRequest) -> bytes:
        if isinstance(url, list) and url:  # some models return a list of outputs
            url = url[0]
        if not url or not isinstance(url, str):
            raise RowError(f"{self.display} reported success but gave no output URL")

        def once() -> bytes:
            try:
                with self.client.stream("GET", url) as response:
                    if response.status_code == 404 or response.status_code == 429 or response.status_code >= 500:
                        raise Retryable(f"result download answered HTTP {response.status_code}", _retry_after(response))
                    if response.status_code >= 400:
                        raise RowError(f"result download answered HTTP {response.status_code}")
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > MAX_RESULT_BYTES:
                        raise RowError(f"result is {declared / 1e6:.0f} MB, over the download limit")
                    chunks, size = [], 0
                    for chunk in response.iter_bytes():
                        size += len(chunk)
                        if size > MAX_RESULT_BYTES:
                            raise RowError("result is over the download limit")
                        chunks.append(chunk)
            except (httpx.TransportError, httpx.DecodingError) as exc:
                raise Retryable(f"result download was truncated or broke off ({type(exc).__name__})") from None
            data = b"".join(chunks)
            if declared and len(data) != declared:
                raise Retryable(f"result arrived truncated ({len(data)} of {declared} bytes)")
            return data

        try:
            return self.retry.call(once, on_retry=self._on_retry(request, "download"), sleep=self._sleep)
        except Retryable as exc:
            raise RowError(f"Could not download the result: {exc}") from None

    # ------------------------------------------------------------------ helpers

    def _raise_for_status(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if status < 400:
            return
        if status == 429 or status >= 500:
            raise Retryable(f"{what} answered HTTP {status}", _retry_after(response))
        hint = " (check the API key)" if status in (401, 403) else ""
        raise RowError(f"{self.display} refused the {what}: HTTP {status} {self._message(response)}{hint}")

    def _message(self, response: httpx.Response) -> str:
        try:
            data = response.json()
            text = data.get("message") or data.get("error") or data.get("detail") or response.text
        except ValueError:
            text = response.text
        return self._redact(str(text)).strip()[:300]

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _cost(self, data: dict[str, Any], default: float | None = None) -> float:
        metrics = data.get("metrics") or {}
        cost = metrics.get("cost")
        try:
            return float(cost) if cost is not None else (self.price_usd if default is None else default)
        except (TypeError, ValueError):
            return self.price_usd

    def _on_retry(self, request: InpaintRequest, what: str):
        def report(attempt: int, exc: Retryable, wait: float) -> None:
            request.tell("retry", step=what, attempt=attempt, reason=self._redact(str(exc)), wait=round(wait, 2))

        return report


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return min(300.0, max(0.0, float(value)))
    except ValueError:
        return None


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        raise RowError(f"the provider answered with something that is not JSON: {response.text[:120]!r}") from None
    if not isinstance(data, dict):
        raise RowError("the provider answered with JSON that is not an object")
    return data


@contextmanager
def _paid(cost: float, prediction_id: str, attempts: int) -> Iterator[None]:
    """Whatever fails once a prediction is paid for fails as PredictionFailed with its
    cost: the ledger keeps the money, whatever the error."""
    try:
        yield
    except PredictionFailed:
        raise
    except RowError as exc:
        raise PredictionFailed(str(exc), cost, prediction_id, attempts) from None
    except Exception as exc:
        raise PredictionFailed(
            f"The result of prediction {prediction_id} could not be used ({type(exc).__name__}: {exc})",
            cost,
            prediction_id,
            attempts,
        ) from None


def _decode(data: bytes) -> tuple[Any, int]:
    try:
        samples, rate = soundio.read(data, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        raise RowError("the result is not audio that can be decoded") from None
    if len(samples) == 0:
        raise RowError("the result holds no audio")
    return samples, rate
