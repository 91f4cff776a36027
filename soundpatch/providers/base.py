"""What every provider takes and gives back.

A provider turns one request (the decoded original, a frame range, a prompt and model
parameters) into the audio for that range. Windowing, padding, resampling and alignment
for hosted models happen behind this interface; the splice is the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from soundpatch.audio import Audio


@dataclass(frozen=True)
class InpaintRequest:
    audio: Audio
    a: int  # first frame of the region
    b: int  # one past its last frame
    prompt: str
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None


@dataclass(frozen=True)
class Prediction:
    fill: np.ndarray  # float32, (b - a, channels): the new audio for the region
    cost_usd: float
    # Frames of equal-power crossfade the splice applies inside each edge; None means
    # the configured default. A provider whose fill already meets its surroundings says 0.
    crossfade: int | None = None
    prediction_id: str | None = None
    attempts: int = 1
    method: str = ""  # how the fill was made, for the report


class Provider(Protocol):
    name: str
    price_usd: float
    # Whether the prompt steers the result; the report says so when it does not.
    uses_prompt: bool

    def inpaint(self, request: InpaintRequest) -> Prediction: ...
