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

import time
from typing import Any

import httpx

from soundpatch import soundio
from soundpatch.audio import Audio, pcm16
from soundpatch.config import ProviderConfig
from soundpatch.cpu import crunching
from soundpatch.errors import ConfigError, RowError
from soundpatch.providers.base import InpaintRequest, Prediction, PredictionFailed
from soundpatch.providers.hosted import (
    HostedProvider,
    capped_body,
    decode_result,
    json_object,
    paid,
    retry_after,
)
from soundpatch.retry import Retryable
from soundpatch.staging import StagedClip, Staging
from soundpatch.window import MODEL_RATE, plan_window, prepare_clip, recover_region

MODEL = "stable-audio-2-5-inpaint"
VERSION = "0.0.1"
TERMINAL_FAILURES = ("failed", "cancelled", "canceled", "error")


class EachLabs(HostedProvider):
    name = "eachlabs"
    model = f"{MODEL}@{VERSION}"
    display = "Each Labs"

    def __init__(self, config: ProviderConfig, staging: Staging | None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.staging = staging

    # ------------------------------------------------------------------ before money

    def ready(self) -> None:
        super().ready()
        if self.staging is None:
            raise ConfigError(f"The {self.name} provider needs storage.staging (an s3:// prefix).")
        self.staging.ready()

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
                    prediction_id, attempts = self._create(
                        lambda attempt: self._send_create(body, request, attempt), request
                    )
                    request.tell("created", prediction_id=prediction_id)
                done = self._wait(prediction_id, request)
                cost = self._cost(done)
                # From here on the prediction is paid for: whatever fails keeps its cost.
                with paid(cost, prediction_id, attempts):
                    data = self._download(done.get("output"), request)
            with paid(cost, prediction_id, attempts), crunching():
                result, result_rate = decode_result(data)
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

    def _send_create(self, body: dict[str, Any], request: InpaintRequest, attempts: int) -> str:
        response = self.client.post(f"{self.base_url}/v1/prediction", json=body, headers=self._headers())
        self._take_answer(response, request)
        data = json_object(response)
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
                    self.polls.throttled(retry_after(response))
                wait = max(interval, retry_after(response) or 0.0)
            elif response is not None and response.status_code >= 400:
                raise PredictionFailed(
                    f"Polling prediction {prediction_id} failed: HTTP {response.status_code} {self._message(response)}",
                    self.price_usd,
                    prediction_id,
                )
            elif response is not None:
                last = json_object(response)
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
                        raise Retryable(f"result download answered HTTP {response.status_code}", retry_after(response))
                    if response.status_code >= 400:
                        raise RowError(f"result download answered HTTP {response.status_code}")
                    declared = int(response.headers.get("content-length") or 0)
                    data = capped_body(response)
            except (httpx.TransportError, httpx.DecodingError) as exc:
                raise Retryable(f"result download was truncated or broke off ({type(exc).__name__})") from None
            if declared and len(data) != declared:
                raise Retryable(f"result arrived truncated ({len(data)} of {declared} bytes)")
            return data

        try:
            return self.retry.call(once, on_retry=self._on_retry(request, "download"), sleep=self._sleep)
        except Retryable as exc:
            raise RowError(f"Could not download the result: {exc}") from None

    # ------------------------------------------------------------------ helpers

    def _cost(self, data: dict[str, Any], default: float | None = None) -> float:
        metrics = data.get("metrics") or {}
        cost = metrics.get("cost")
        try:
            return float(cost) if cost is not None else (self.price_usd if default is None else default)
        except (TypeError, ValueError):
            return self.price_usd
