"""Hosted predictions made from a URL and collected later: stage, create, poll, download.

Each Labs and fal work this way: the clip is put where the provider can fetch it (a
presigned URL under `storage.staging`), a create returns an id, the id is polled until the
prediction ends, and its result is downloaded from the URL the provider gives. This module
is that journey and its money rules; a provider module says only how its service spells
each step (`_send_create`, `_status_url`, `_read_poll`, `_cancel`).

- Once a prediction id is known it is only ever polled, never created again; a resumed row
  comes back with its id and goes straight to polling.
- Polls are free: transient errors just wait. A prediction not done by
  `provider.deadline_seconds` is cancelled and counted as spent.
- Once the provider says a prediction succeeded it is paid for, whatever fails after.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import numpy as np

from soundpatch import soundio
from soundpatch.audio import pcm16
from soundpatch.config import ProviderConfig
from soundpatch.cpu import crunching
from soundpatch.errors import ConfigError, RowError, lasting_tls_failure, network_reason
from soundpatch.providers.base import InpaintRequest, PaidAnswer, Prediction, PredictionFailed
from soundpatch.providers.hosted import HostedProvider, capped_body, paid, retry_after
from soundpatch.retry import Retryable
from soundpatch.staging import StagedClip, Staging
from soundpatch.web import shown
from soundpatch.window import MODEL_RATE, Window


@dataclass(frozen=True)
class Poll:
    """What one status poll said, in the provider's words translated."""

    state: Literal["running", "succeeded", "failed"]
    output: str | None = None  # where the result can be downloaded (succeeded)
    cost: float | None = None  # what the provider says it cost, if it says
    reason: str = ""  # why it failed, or its status word
    cancel_url: str | None = None


class QueuedProvider(HostedProvider):
    def __init__(self, config: ProviderConfig, staging: Staging | None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.staging = staging

    def ready(self) -> None:
        super().ready()
        if self.staging is None:
            raise ConfigError(f"The {self.name} provider needs storage.staging (an s3:// prefix).")
        self.staging.ready()

    # ------------------------------------------------------------------ what a service spells

    def _send_create(self, model_input: dict[str, Any], request: InpaintRequest, attempt: int) -> str:
        """Make the prediction; its id. Runs under `_create`'s money rules."""
        raise NotImplementedError

    def _status_url(self, prediction_id: str) -> str:
        raise NotImplementedError

    def _read_poll(self, prediction_id: str, response: httpx.Response) -> Poll:
        """A successful (2xx) status answer, read."""
        raise NotImplementedError

    def _cancel(self, prediction_id: str, last: Poll | None) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ the journey

    def _predict(self, request: InpaintRequest, window: Window, clip: np.ndarray) -> Prediction:
        assert self.staging is not None
        staged = None
        try:
            if not request.resume_prediction_id:
                staged = self._stage(request, window, clip)
            with self.in_flight.slot():  # from the create until the result is fetched
                if request.resume_prediction_id:
                    prediction_id, attempts = request.resume_prediction_id, 0
                else:
                    assert staged is not None
                    request.check_may_start()
                    model_input = self._input(request, window, staged.url)
                    prediction_id, attempts = self._create(
                        lambda attempt: self._send_create(model_input, request, attempt), request
                    )
                # Created: it is owed from here on, and only ever polled again, whatever fails.
                with paid(self.price_usd, prediction_id, attempts):
                    if not request.resume_prediction_id:
                        request.tell("created", prediction_id=prediction_id)
                    done = self._wait(prediction_id, request)
                cost = self.price_usd if done.cost is None else done.cost
                # From here on the prediction is paid for: whatever fails keeps its cost.
                with paid(cost, prediction_id, attempts):
                    data = self._download(done.output, request)
        finally:
            if staged is not None:
                self.staging.remove(staged)
                if staged.uri is not None:
                    request.tell("unstaged", uri=str(staged.uri))
        again = lambda: self._download(done.output, request)  # noqa: E731
        return self._use(PaidAnswer(data, cost, prediction_id), attempts, again, clip, window, request)

    def _fetch_again(self, prediction_id: str | None, request: InpaintRequest) -> Callable[[], bytes] | None:
        """A kept answer that cannot be used: its prediction is asked for where its result
        is now, and that is downloaded again."""
        if not prediction_id:
            return None
        return lambda: self._download(self._wait(prediction_id, request).output, request)

    def _stage(self, request: InpaintRequest, window: Window, clip: np.ndarray) -> StagedClip:
        audio = request.audio
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
        self.staging.within_reach()  # before the clip is made and journaled as staged
        with crunching():
            wav = soundio.write(pcm16(clip), MODEL_RATE, "WAV", "PCM_16")
        # Journaled before the upload: a run killed while it uploads still removes it on the rerun.
        request.tell("staged", uri=str(self.staging.uri_for(wav, request.staging_folder)))
        return self.staging.stage(wav, request.staging_folder)

    def _input(self, request: InpaintRequest, window: Window, url: str) -> dict[str, Any]:
        """The model's input, as Stable Audio 2.5 Inpaint names it on every queue that hosts it."""
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

    def _wait(self, prediction_id: str, request: InpaintRequest) -> Poll:
        """Poll until the prediction ends; polls are free, so transient errors just wait."""
        deadline = time.monotonic() + self.config.deadline_seconds
        interval = self.config.poll_seconds
        url = self._status_url(prediction_id)
        last: Poll | None = None
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
                raise PredictionFailed(  # it may still be running, or done: polled again next time
                    f"Polling prediction {prediction_id} failed: HTTP {response.status_code} {self._message(response)}",
                    self.price_usd,
                    prediction_id,
                    collectable=True,
                    unseen=response.status_code in (401, 403, 404),
                )
            elif response is not None:
                try:
                    last = self._read_poll(prediction_id, response)
                except RowError as exc:  # a gateway's page, not the service's answer: ask again
                    request.tell("poll_retry", status=response.status_code, reason=self._redact(str(exc))[:120])
                else:
                    if last.state == "succeeded":
                        return last
                    if last.state == "failed":
                        raise PredictionFailed(
                            f"{self.display} reports prediction {prediction_id} {self._redact(last.reason)[:300]}",
                            self.price_usd if last.cost is None else last.cost,
                            prediction_id,
                        )
            owed = self.price_usd if last is None or last.cost is None else last.cost
            if request.should_cancel is not None and request.should_cancel():
                self._cancel(prediction_id, last)
                raise PredictionFailed(
                    f"Prediction {prediction_id} was cancelled because the run was interrupted", owed, prediction_id
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
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # not begun: say why, not a class name
                why = f"cannot connect to {shown(url)} ({network_reason(exc)})"
                if lasting_tls_failure(exc):  # a certificate does not come to be trusted in seconds
                    raise RowError(f"Could not download the result: {why}") from None
                raise Retryable(why) from None
            except (httpx.TransportError, httpx.DecodingError) as exc:
                raise Retryable(f"result download was truncated or broke off ({type(exc).__name__})") from None
            if declared and len(data) != declared:
                raise Retryable(f"result arrived truncated ({len(data)} of {declared} bytes)")
            return data

        try:
            return self.retry.call(once, on_retry=self._on_retry(request, "download"), sleep=self._sleep)
        except Retryable as exc:
            raise RowError(f"Could not download the result: {exc}") from None
