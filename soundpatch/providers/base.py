"""What every provider takes and gives back.

A provider turns one request (the decoded original, a frame range, a prompt and model
parameters) into the audio for that range. Windowing, padding, resampling and alignment
for hosted models happen behind this interface; the splice is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from soundpatch.audio import Audio
from soundpatch.errors import RowError

# notify(event, fields): what a provider reports as it goes (prediction created, retry...),
# journaled by the caller before the provider takes its next step.
Notify = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class PaidAnswer:
    """A provider's paid answer as it came (the result's encoded bytes), before it is used:
    kept on disk by the caller, so that a run that dies while using it can finish the row
    from it instead of paying for another."""

    data: bytes
    cost_usd: float
    prediction_id: str | None = None


@dataclass(frozen=True)
class InpaintRequest:
    audio: Audio
    a: int  # first frame of the region
    b: int  # one past its last frame
    prompt: str
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    # Frame ranges [a, b) inside the region that are damaged (a row's `damaged`), where the rest
    # of the region is sound: the local engine rebuilds these alone, and a model's audio is put
    # into these alone (splicing.py). Empty: all of the region.
    damaged: tuple[tuple[int, int], ...] = ()
    source: str | None = None  # where the audio came from (an s3:// input can be shared as is)
    staging_folder: str = "clips"  # where clips for this run are staged (one per distinct clip)
    notify: Notify | None = None
    # A prediction created by an earlier attempt (before a crash): poll it, never recreate.
    resume_prediction_id: str | None = None
    # A paid answer an earlier attempt kept and did not get to use: used now, nothing is sent.
    kept_answer: PaidAnswer | None = None
    # The clip settings (provider.context_seconds, provider.pad) to cut with, when not the
    # provider's own: what an earlier attempt paid for is cut as it was sent.
    context_seconds: float | None = None
    pad: str | None = None
    # Given each paid answer the moment it is in hand, before anything is done with it.
    keep_answer: Callable[[PaidAnswer], None] | None = None
    # Asked while waiting: should the prediction be cancelled now (the run is stopping)?
    should_cancel: Callable[[], bool] | None = None
    # Asked once a slot is free, before a new prediction is made: may it still start?
    may_start: Callable[[], bool] | None = None
    # Asked then too: why the room on disk made sure of for its result is gone since (the
    # disk filled up while it waited its turn), or None while it is there.
    room_gone: Callable[[], str | None] | None = None

    def stopping(self) -> bool:
        """The run was asked to stop: no new prediction may start."""
        return self.may_start is not None and not self.may_start()

    def check_may_start(self) -> None:
        if self.stopping():
            raise NotStarted("the run is stopping")
        gone = self.room_gone() if self.room_gone is not None else None
        if gone is not None:
            raise RoomGone(gone)

    def keep(self, answer: PaidAnswer, replaces: bool = False) -> None:
        """Hand a paid answer to the caller to keep; one already kept is not kept again,
        unless this is a fresh copy that `replaces` it (the kept one would not do)."""
        if self.keep_answer is not None and (self.kept_answer is None or replaces):
            self.keep_answer(answer)

    def tell(self, event: str, **fields: Any) -> None:
        if self.notify is not None:
            self.notify(event, fields)


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
    offset_ms: float = 0.0  # misalignment of the provider's result that was found and undone


class PredictionFailed(RowError):
    """The provider was asked and it did not work out; `cost_usd` may still be owed.

    A prediction that was created (or may have been: the request went out and no answer
    came back) is paid for unless the provider says otherwise, so the ledger keeps it.
    `collectable`: the provider made it and did not say it failed, and what went wrong was
    on the way back (polling, downloading, decoding, aligning): its id, or its answer kept
    on disk, is worth collecting again rather than paying for a new one. `unseen`: asked
    for by its id, the provider said it knows no such prediction for this key (401, 403
    or 404): one another run made, on an account of its own. `in_doubt`: the create went
    out and what it made, if anything, can never be collected (no answer came, or one with
    no prediction id): it is not sent again unless provider.resubmit_in_doubt says to.
    """

    def __init__(
        self,
        message: str,
        cost_usd: float,
        prediction_id: str | None = None,
        attempts: int = 1,
        collectable: bool = False,
        unseen: bool = False,
        in_doubt: bool = False,
    ):
        super().__init__(message)
        self.unseen = unseen
        self.in_doubt = in_doubt
        self.cost_usd = cost_usd
        self.prediction_id = prediction_id
        self.attempts = attempts
        self.collectable = collectable


class NotStarted(RowError):
    """The row waited for a prediction slot and the run was asked to stop meanwhile: nothing
    was sent, nothing is owed."""

    sent = 0  # creates this row sent before it was stopped (each turned away)


class RoomGone(NotStarted):
    """The disk its result is to be written to filled up while the row waited for a slot:
    nothing was sent, nothing is owed."""


class OutOfReach(NotStarted):
    """Creates to this provider, or clips to its staging bucket, have come to nothing many
    times in a row (providers/reach.py): this one was not sent, nothing is owed. `until`:
    what the rerun waits for (by default, that the provider answers)."""

    def __init__(self, message: str, until: str | None = None) -> None:
        super().__init__(message)
        self.until = until or "the provider answers"


class Provider(Protocol):
    name: str
    # What produces the audio, versioned: part of each edit's identity, so a new model or
    # engine version never reuses results of the old one.
    model: str
    price_usd: float
    # Whether the prompt steers the result; the report says so when it does not.
    uses_prompt: bool
    # Whether a prediction is made at a provider (a create goes out, and is paid for).
    hosted: bool

    def ready(self) -> None:
        """Raise ConfigError if the provider cannot work at all (no key, no staging)."""

    def check(
        self, audio_frames: int, rate: int, a: int, b: int, steps: int | None, guidance_scale: float | None
    ) -> None:
        """Raise RowError if the provider would refuse this edit (checked before any money)."""

    def inpaint(self, request: InpaintRequest) -> Prediction: ...
