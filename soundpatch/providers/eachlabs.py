"""Stable Audio 2.5 Inpaint through the Each Labs prediction API: create, poll, download.

    POST {base}/v1/prediction        {"model", "version", "input": {...}} -> {"predictionID"}
    GET  {base}/v1/prediction/{id}   -> {"status", "output", "metrics": {"cost"}, "urls"}
    POST {base}/v1/prediction/{id}/cancel

The journey and its money rules are the queued providers' (queued.py); what Each Labs
adds is that it reports each prediction's cost, which the report shows and the ledger keeps.
The API key travels in the X-API-Key header only; it is redacted from every message.
"""

from __future__ import annotations

from typing import Any

import httpx

from soundpatch.providers.base import InpaintRequest, PredictionFailed
from soundpatch.providers.hosted import json_object
from soundpatch.providers.queued import Poll, QueuedProvider

MODEL = "stable-audio-2-5-inpaint"
VERSION = "0.0.1"
SUCCEEDED = ("success", "succeeded", "completed")
TERMINAL_FAILURES = ("failed", "cancelled", "canceled", "error")


class EachLabs(QueuedProvider):
    name = "eachlabs"
    model = f"{MODEL}@{VERSION}"
    display = "Each Labs"

    def _headers(self) -> dict[str, str]:
        return {"X-API-Key": self._api_key, "Content-Type": "application/json"}

    def _send_create(self, model_input: dict[str, Any], request: InpaintRequest, attempt: int) -> str:
        body = {"model": MODEL, "version": VERSION, "input": model_input}
        response = self.client.post(f"{self.base_url}/v1/prediction", json=body, headers=self._headers())
        self._take_answer(response, request)
        with self._accepted(attempt):
            data = json_object(response)
        prediction_id = data.get("predictionID") or data.get("id")
        if not prediction_id:
            raise PredictionFailed(
                f"{self.display} accepted the create but returned no prediction id: "
                f"{self._redact(response.text)[:200]}",
                self.price_usd,
                None,
                attempt,
                in_doubt=True,
            )
        return str(prediction_id)

    def _status_url(self, prediction_id: str) -> str:
        return f"{self.base_url}/v1/prediction/{prediction_id}"

    def _read_poll(self, prediction_id: str, response: httpx.Response) -> Poll:
        data = json_object(response)
        status = str(data.get("status", "")).lower()
        cancel_url = (data.get("urls") or {}).get("cancel")
        if status in SUCCEEDED:
            return Poll("succeeded", output=data.get("output"), cost=_cost(data), cancel_url=cancel_url)
        if status in TERMINAL_FAILURES:
            reason = f"{status}: {data.get('error') or data.get('logs') or status}"
            return Poll("failed", cost=_cost(data), reason=reason, cancel_url=cancel_url)
        return Poll("running", cost=_cost(data), reason=status, cancel_url=cancel_url)

    def _cancel(self, prediction_id: str, last: Poll | None) -> None:
        url = (last.cancel_url if last else None) or f"{self.base_url}/v1/prediction/{prediction_id}/cancel"
        try:
            self.client.post(url, headers=self._headers())
        except httpx.HTTPError:
            pass


def _cost(data: dict[str, Any]) -> float | None:
    """The cost Each Labs reports for a prediction, if it does (None: not yet, or not a number)."""
    cost = (data.get("metrics") or {}).get("cost")
    try:
        return float(cost) if cost is not None else None
    except (TypeError, ValueError):
        return None
