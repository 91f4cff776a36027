"""Stable Audio 2.5 Inpaint through fal's queue: submit, poll the status, fetch the result.

    POST {base}/fal-ai/stable-audio-25/inpaint                 {input} -> {"request_id", ...}
    GET  {base}/fal-ai/stable-audio-25/requests/{id}/status    -> {"status": IN_QUEUE |
                                                                   IN_PROGRESS | COMPLETED}
    GET  {base}/fal-ai/stable-audio-25/requests/{id}           -> {"audio": {"url", ...}, "seed"}
    PUT  {base}/fal-ai/stable-audio-25/requests/{id}/cancel

The journey and its money rules are the queued providers' (queued.py). fal reports no
amount per request, so a result costs the list price (`provider.price_usd`, default
$0.20). A request that COMPLETED with an error is kept at that price too, except when fal
answers 422: the model refused its input, nothing was generated, nothing is owed.
The key travels in the Authorization header ("Key ...") only; it is redacted from every
message.
"""

from __future__ import annotations

from typing import Any

import httpx

from soundpatch.providers.base import InpaintRequest, PredictionFailed
from soundpatch.providers.hosted import json_object
from soundpatch.providers.queued import Poll, QueuedProvider

APP = "fal-ai/stable-audio-25"
ENDPOINT = f"{APP}/inpaint"


class Fal(QueuedProvider):
    name = "fal"
    model = ENDPOINT
    display = "fal"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Key {self._api_key}", "Content-Type": "application/json"}

    def _send_create(self, model_input: dict[str, Any], request: InpaintRequest, attempt: int) -> str:
        response = self.client.post(f"{self.base_url}/{ENDPOINT}", json=model_input, headers=self._headers())
        self._take_answer(response, request)
        with self._accepted(attempt):
            request_id = json_object(response).get("request_id")
        if not request_id:
            raise PredictionFailed(
                f"fal accepted the request but returned no request_id: {self._redact(response.text)[:200]}",
                self.price_usd,
                None,
                attempt,
                in_doubt=True,
            )
        return str(request_id)

    def _status_url(self, prediction_id: str) -> str:
        return f"{self.base_url}/{APP}/requests/{prediction_id}/status"

    def _read_poll(self, prediction_id: str, response: httpx.Response) -> Poll:
        status = str(json_object(response).get("status", "")).upper()
        if status != "COMPLETED":
            return Poll("running", reason=status)
        # Done, one way or the other: the result (or the error) is at the request's URL.
        try:
            result = self.client.get(f"{self.base_url}/{APP}/requests/{prediction_id}", headers=self._headers())
        except httpx.HTTPError:
            return Poll("running", reason="COMPLETED")  # asked again at the next poll
        if result.status_code == 429 or result.status_code in (502, 503, 504):
            return Poll("running", reason="COMPLETED")
        if result.status_code >= 400:
            cost = 0.0 if result.status_code == 422 else None
            return Poll("failed", cost=cost, reason=f"failed: HTTP {result.status_code} {self._message(result)}")
        audio = json_object(result).get("audio")
        url = audio.get("url") if isinstance(audio, dict) else audio
        return Poll("succeeded", output=url if isinstance(url, str) else None)

    def _cancel(self, prediction_id: str, last: Poll | None) -> None:
        try:
            self.client.put(f"{self.base_url}/{APP}/requests/{prediction_id}/cancel", headers=self._headers())
        except httpx.HTTPError:
            pass
