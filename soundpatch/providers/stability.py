"""Stable Audio 2.5 Inpaint straight from Stability AI: one synchronous call per edit.

    POST {base}/v2beta/audio/stable-audio-2/inpaint   multipart: audio (the clip), prompt,
         model, duration, mask_start, mask_end, seed, steps, output_format
         Authorization: Bearer <key>, Accept: audio/*   -> 200 and the audio itself

No bucket is needed (the clip travels in the request) and there is no prediction id: the
answer to the call is the result. So the money rules read:
- a call refused (4xx) or turned away (429, 500, 503) made nothing and costs nothing;
  429 and those 5xx are retried with backoff, and a 429 slows every row;
- a call whose answer never came (timeout, broken connection, or a gateway's 502/504
  while the model may still be running behind it) is in doubt: counted as spent and
  never sent again (the journal shows it; `provider.resubmit_in_doubt` overrides);
- an answer of 200 is paid for, whatever happens to its audio after.
The key travels in the Authorization header only; it is redacted from every message.
"""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np

from soundpatch import soundio
from soundpatch.audio import pcm16
from soundpatch.cpu import crunching
from soundpatch.errors import RowError
from soundpatch.providers.base import InpaintRequest, PaidAnswer, Prediction
from soundpatch.providers.hosted import HostedProvider, capped_body, paid
from soundpatch.window import MODEL_RATE, Window

PATH = "/v2beta/audio/stable-audio-2/inpaint"
MODEL = "stable-audio-2.5"
# Answers from a gateway in front of the model: the model may have run (and billed) anyway.
GATEWAY_STATUSES = (502, 504, 520, 522, 524)


class Stability(HostedProvider):
    name = "stability"
    model = f"stability/{MODEL}"
    display = "Stability AI"

    def check(
        self, audio_frames: int, rate: int, a: int, b: int, steps: int | None, guidance_scale: float | None
    ) -> None:
        super().check(audio_frames, rate, a, b, steps, guidance_scale)
        if guidance_scale is not None:
            raise RowError(
                "This provider takes no guidance_scale (Stability AI's inpaint API has no such setting); leave it out"
            )

    def _predict(self, request: InpaintRequest, window: Window, clip: np.ndarray) -> Prediction:
        with crunching():
            wav = soundio.write(pcm16(clip), MODEL_RATE, "WAV", "PCM_16")
        fields = {
            "prompt": request.prompt,
            "model": MODEL,
            "duration": str(window.seconds_total),
            "mask_start": str(window.mask_start),
            "mask_end": str(window.mask_end),
            "output_format": "wav",  # lossless: nothing to undo but the model's own shift
        }
        if request.seed is not None:
            fields["seed"] = str(request.seed)
        if request.steps is not None:
            fields["steps"] = str(request.steps)
        with self.in_flight.slot():  # from the call until its answer is in
            request.check_may_start()
            data, attempts = self._create(lambda attempt: self._send(fields, wav, request, attempt), request)
        # Stability bills a generation it answered; it reports no amount.
        return self._prediction(PaidAnswer(data, self.price_usd), attempts, clip, window, request)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}", "Accept": "audio/*"}

    def _send(self, fields: dict[str, str], wav: bytes, request: InpaintRequest, attempts: int) -> bytes:
        with self.client.stream(
            "POST",
            f"{self.base_url}{PATH}",
            data=fields,
            files={"audio": ("clip.wav", wav, "audio/wav")},
            headers=self._headers(),
            # The call lasts as long as the model runs: its answer may take up to the deadline.
            timeout=httpx.Timeout(self.config.timeout_seconds, connect=10.0, read=self.config.deadline_seconds),
        ) as response:
            if response.status_code in GATEWAY_STATUSES:
                raise self._in_doubt(f"got no answer (HTTP {response.status_code} from a gateway)", attempts)
            if response.status_code >= 400:
                response.read()  # the error's message
            self._take_answer(response, request)
            request.tell("answered", status=response.status_code)  # made and billed
            with paid(self.price_usd, None, attempts):
                return self._audio(response)

    def _audio(self, response: httpx.Response) -> bytes:
        """The audio of a 200 answer: the body itself, or base64 in JSON if that is what came."""
        data = capped_body(response)
        finish = response.headers.get("finish-reason", "SUCCESS")
        if response.headers.get("content-type", "").startswith("application/json"):
            try:
                body = json.loads(data)
                finish = str(body.get("finish_reason") or finish)
                data = base64.b64decode(body.get("audio") or "")
            except (ValueError, AttributeError):
                raise RowError("Stability AI answered 200 with JSON that holds no audio") from None
        if finish.upper() == "CONTENT_FILTERED":
            raise RowError("Stability AI's content filter withheld the result (finish-reason CONTENT_FILTERED)")
        return data
