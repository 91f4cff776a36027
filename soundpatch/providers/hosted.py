"""What every hosted provider shares: its key, its HTTP client, its limits, and the money
rules for results that were paid for.

A provider module says only what its service's protocol is (URLs, bodies, statuses);
this one holds how soundpatch talks to any of them: the key read from the environment
(or handed over from a Prefect Secret) and redacted from every message, one pooled
client sized to the concurrency, creates and polls paced by shared limiters, bounded
retries reported to the journal, and a result that arrives paid for staying paid for
whatever goes wrong after.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx
import numpy as np
import soundfile as sf

from soundpatch import soundio, tls
from soundpatch.config import ProviderConfig
from soundpatch.cpu import crunching
from soundpatch.errors import ConfigError, RowError, as_sentence, lasting_tls_failure, network_reason
from soundpatch.humanize import plural
from soundpatch.journal import JournalUnwritable
from soundpatch.limits import InFlight, RateLimiter
from soundpatch.providers.base import (
    InpaintRequest,
    NotStarted,
    OutOfReach,
    PaidAnswer,
    Prediction,
    PredictionFailed,
)
from soundpatch.providers.reach import Reach
from soundpatch.retry import Retryable, RetryPolicy
from soundpatch.window import MODEL_RATE, Window, plan_window, prepare_clip, recover_region

MAX_RESULT_BYTES = 256 * 1024 * 1024  # a 190 s stereo float WAV is ~67 MB
STEPS_RANGE = (4, 8)
T = TypeVar("T")


class Refused(RowError):
    """Nothing was made: the service answered a request with a 4xx other than 429, or its
    connection could not be made safe (TLS). `every_row`: any row would meet the same (the
    key refused, the account out of credit, the certificate not trusted), not only this
    one's content; `until`: what a rerun waits for, when it is not just an answer."""

    def __init__(self, message: str, status: int | None, every_row: bool = False, until: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.every_row = every_row
        self.until = until


KEY_REFUSED = "check the API key"
OUT_OF_CREDIT = "the account is out of credit: top it up"
_CREDIT_WORDS = re.compile(r"balance|credit|top.?up|payment|billing|\bfunds\b", re.IGNORECASE)
# A 403 that is about what the row asked for: Stability AI answers a prompt its content
# moderation flags with 403 `content_moderation`.
_CONTENT_WORDS = re.compile(r"moderat|flagged|content.?polic", re.IGNORECASE)
# A key refused because its account is held (fal: "User is locked. Reason: Admin lock"):
# a new key will not help; the provider's support will.
ACCOUNT_LOCKED = "the account is locked or suspended: ask the provider why"
_LOCK_WORDS = re.compile(r"\blocked\b|suspended|deactivated|\bbanned\b", re.IGNORECASE)


def account_problem(status: int, message: str) -> str | None:
    """What is wrong with the account when a refusal is the account's, not the row's (every
    row would meet it): its credit used up (402 Payment Required, or a 401/403 that says so,
    as fal's "User is locked. Reason: Exhausted balance" does), the account held by the
    provider (a 401/403 saying it is locked or suspended), or its key (401/403). A 403
    for the row's content (moderation) is the row's."""
    if status == 403 and _CONTENT_WORDS.search(message):
        return None
    if status == 402 or (status in (401, 403) and _CREDIT_WORDS.search(message)):
        return OUT_OF_CREDIT
    if status in (401, 403) and _LOCK_WORDS.search(message):
        return ACCOUNT_LOCKED
    if status in (401, 403):
        return KEY_REFUSED
    return None


# What a rerun waits for, by what is wrong with the account ("run it again ... once ...").
_MENDED_WHEN = {
    OUT_OF_CREDIT: "the account has credit again",
    ACCOUNT_LOCKED: "the provider has unlocked the account",
    KEY_REFUSED: "the key is right",
}


class HostedProvider:
    name = "hosted"
    display = "the provider"
    model_name = "stable-audio-2.5"  # for the report's method column
    uses_prompt = True
    hosted = True

    def __init__(
        self,
        config: ProviderConfig,
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
        self.base_url = config.url
        self._api_key = api_key if api_key is not None else os.environ.get(config.key_env, "")
        timeout = httpx.Timeout(config.timeout_seconds, connect=10.0)
        # Pool sized to the work in flight (polls, and creates and downloads of rows on
        # either side of it): a much larger pool costs CPU in bookkeeping.
        limits = httpx.Limits(max_connections=2 * concurrency + 4, max_keepalive_connections=2 * concurrency + 4)
        self.client = client or httpx.Client(timeout=timeout, limits=limits, verify=tls.verify())
        self.retry = RetryPolicy(attempts=config.max_retries + 1)
        self.reach = Reach(after=max(3, concurrency))  # a whole wave of rows in flight, at least
        self._sleep = sleep

    def check(
        self, audio_frames: int, rate: int, a: int, b: int, steps: int | None, guidance_scale: float | None
    ) -> None:
        """Every host of Stable Audio 2.5 Inpaint takes a 6-190 s clip and 4-8 steps."""
        plan_window(audio_frames, rate, a, b, self.config.context_seconds)
        if steps is not None and not STEPS_RANGE[0] <= steps <= STEPS_RANGE[1]:
            raise RowError(f"steps {steps} is outside {STEPS_RANGE[0]}..{STEPS_RANGE[1]} for Stable Audio 2.5")

    def ready(self) -> None:
        if not self._api_key and not self.config.api_key_secret:
            raise ConfigError(
                f"The {self.name} provider needs an API key: set the environment variable "
                f"{self.config.key_env} (provider.api_key_env names it)."
            )

    def _headers(self) -> dict[str, str]:
        """The headers of every request to the service (its key among them)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ one edit

    def inpaint(self, request: InpaintRequest) -> Prediction:
        """The window the model is sent, and the paid answer put back into it: the answer an
        earlier attempt kept and did not get to use (then nothing is sent), or a new one."""
        audio = request.audio
        with crunching():
            context = self.config.context_seconds if request.context_seconds is None else request.context_seconds
            window = plan_window(audio.frames, audio.rate, request.a, request.b, context)
            clip = prepare_clip(audio, window, request.pad or self.config.pad)
        kept = request.kept_answer
        if kept is None:
            self._within_reach()  # before a clip is staged for it, too
            return self._predict(request, window, clip)
        again = self._fetch_again(kept.prediction_id, request)
        return self._use(kept, 0, again, clip, window, request)

    def _predict(self, request: InpaintRequest, window: Window, clip: np.ndarray) -> Prediction:
        """A new prediction for `clip`, in the service's protocol."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the create

    def _within_reach(self, tried: int = 0) -> None:
        """Raise OutOfReach once creates to this provider have come to nothing many times
        in a row (providers/reach.py); `tried`: this row's creates so far."""
        lost = self.reach.lost()
        if lost is not None:
            raise OutOfReach(f"Not sent to {self.display}{' again' if tried else ''}: {lost}", until=self.reach.until)

    def _create(self, send: Callable[[int], T], request: InpaintRequest) -> tuple[T, int]:
        """`send(attempt)` makes the create (the request that is billed) and reads its answer;
        here it is paced, journaled and retried under the money rules:
        - refused (4xx) or turned away (429, 5xx, a connection that never opened): nothing
          was made, nothing is owed; 429, 5xx and refused connections are tried again;
        - sent and never answered: in doubt, counted as spent, never sent again.
        (result, number of tries)"""
        attempts = 0

        def once() -> T:
            nonlocal attempts
            self._within_reach(tried=attempts)
            # A run stopped while this row waits its turn ends the wait, and so does the provider
            # found out of reach by the rows before it: then nothing is sent.
            self.creates.acquire(give_up=lambda: request.stopping() or self.reach.lost() is not None)
            request.check_may_start()
            # And a provider found out of reach meanwhile (the account out of credit, say, as
            # the rows before it in the queue were refused): then it is not sent either.
            self._within_reach(tried=attempts)
            # Journaled before the request goes out: if we die now, the row is "in doubt". A
            # journal that cannot be written (a full disk) sends nothing.
            try:
                request.tell("creating", attempt=attempts + 1)
            except JournalUnwritable as exc:
                raise NotStarted(str(exc)) from None
            # The disk may have held it past its turn: not within a window of the rows before.
            self.creates.sending()
            attempts += 1
            try:
                return send(attempts)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                request.tell("create_refused", reason=type(exc).__name__)
                why = f"cannot connect to {self.base_url} ({network_reason(exc)})"
                if lasting_tls_failure(exc):  # does not mend in seconds, and every row would meet it
                    raise Refused(why, None, every_row=True) from None
                raise Retryable(why) from None
            except httpx.HTTPError as exc:
                # Sent, and no (whole) answer: the provider may have made it, and billed it.
                raise self._in_doubt(f"got no answer ({type(exc).__name__})", attempts) from None
            except (Retryable, RowError):  # judged by its status: turned away, refused, or paid
                raise
            except Exception as exc:  # a fault of ours once it went out: it may exist all the same
                what = f"{type(exc).__name__}: {str(exc)[:200]}"
                raise self._in_doubt(f"went out and its answer could not be taken in ({what})", attempts) from None

        try:
            result = self.retry.call(once, on_retry=self._on_retry(request, "create"), sleep=self._sleep)
        except Retryable as exc:
            self.reach.missed(str(exc))
            tries = plural(attempts, "attempt")
            raise PredictionFailed(
                f"{self.display} did not take the create after {tries}: {exc}", 0.0, None, attempts
            ) from None
        except PredictionFailed as exc:  # in doubt (paid, no answer), or refused on its answer
            if exc.cost_usd:
                self.reach.missed(str(exc))
            else:
                self.reach.answered()
            raise
        except NotStarted as exc:  # stopped, or out of reach, before its next try went out
            exc.sent = attempts
            raise
        except RowError as exc:  # refused (4xx): nothing was made, nothing is owed
            if isinstance(exc, Refused) and exc.every_row:
                # the key, the account's credit, or TLS: every row would be refused the same way
                self.reach.missed(str(exc), until=exc.until)
            else:
                self.reach.answered()
            raise PredictionFailed(str(exc), 0.0, None, attempts) from None
        self.reach.answered()
        return result, attempts

    @contextmanager
    def _accepted(self, attempts: int) -> Iterator[None]:
        """Reading a create's successful answer: one that cannot be read (a gateway's page
        with a 200, JSON of another shape) leaves the prediction in doubt, not refused."""
        try:
            yield
        except PredictionFailed:
            raise
        except Exception as exc:
            why = as_sentence(str(exc)).rstrip(".")
            raise self._in_doubt(f"was taken but its answer could not be read ({why})", attempts) from None

    def _take_answer(self, response: httpx.Response, request: InpaintRequest) -> None:
        """Journal and pace by a create's answer; raise unless it is a success."""
        status = response.status_code
        if status >= 400:
            request.tell("create_refused", status=status)
        if status == 429:
            self.creates.throttled(self._retry_after(response))
        elif status < 400:
            self.creates.succeeded()
        self._raise_for_status(response, "create")

    def _fetch_again(self, prediction_id: str | None, request: InpaintRequest) -> Callable[[], bytes] | None:
        """How to fetch a paid prediction's answer once more, free, by its id; None where
        the answer that came is all there is of it (a synchronous service's)."""
        return None

    def _use(
        self,
        answer: PaidAnswer,
        attempts: int,
        fetch_again: Callable[[], bytes] | None,
        clip: np.ndarray,
        window: Window,
        request: InpaintRequest,
    ) -> Prediction:
        """A paid answer put back (`_prediction`). One that cannot be used may be a damaged
        copy (a faulty cache or disk serves the right length, wrong bytes): where the
        provider can give it again, it is fetched once more and, if it differs, used."""
        cost, prediction_id = answer.cost_usd, answer.prediction_id
        try:
            return self._prediction(answer, attempts, clip, window, request)
        except PredictionFailed as unusable:
            if fetch_again is None or not unusable.collectable:
                raise
            request.tell("fetching_again", prediction_id=prediction_id, reason=self._redact(str(unusable))[:200])
            try:
                with paid(cost, prediction_id, attempts):
                    fresh = fetch_again()
            except PredictionFailed as exc:
                why = as_sentence(str(exc)).rstrip(".")
                raise PredictionFailed(
                    f"{as_sentence(str(unusable)).rstrip('.')}, and fetching it again failed ({why})",
                    cost,
                    prediction_id,
                    attempts,
                    collectable=True,
                ) from None
            if fresh == answer.data:
                raise  # the provider's own answer is what cannot be used
            request.tell("fetched_again", prediction_id=prediction_id)
            return self._prediction(PaidAnswer(fresh, cost, prediction_id), attempts, clip, window, request, True)

    def _prediction(
        self,
        answer: PaidAnswer,
        attempts: int,
        clip: np.ndarray,
        window: Window,
        request: InpaintRequest,
        replaces: bool = False,
    ) -> Prediction:
        """A paid answer put back where it belongs: aligned to the clip that was sent, back
        at the input's rate and layout, cut to the region. Whatever fails keeps its cost.
        The answer is handed to the caller to keep first: should the run die while it is
        used, the next attempt finishes the row from it instead of paying again.
        `replaces`: it is a fresh copy of one kept before, kept in its place."""
        cost, prediction_id = answer.cost_usd, answer.prediction_id
        with paid(cost, prediction_id, attempts):
            request.keep(answer, replaces=replaces)
            with crunching():
                result, result_rate = decode_result(answer.data)
                fill, offset = recover_region(result, result_rate, clip, window, request.audio, request.a, request.b)
        method = (
            f"{self.model_name} via {self.display} (window {window.offset_seconds:.2f}+{window.seconds_total} s, "
            f"mask {window.mask_start}-{window.mask_end} s, aligned {offset} samples)"
        )
        if request.damaged:  # (the splice puts it there: splicing.py)
            method += f", into {plural(len(request.damaged), 'damaged span')} of the region alone"
        return Prediction(
            fill=fill,
            cost_usd=cost,
            prediction_id=prediction_id,
            attempts=attempts,
            method=method,
            offset_ms=offset / MODEL_RATE * 1000,
        )

    # ------------------------------------------------------------------ answers

    def _raise_for_status(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if status < 400:
            return
        if status == 429 or status >= 500:
            raise Retryable(f"{what} answered HTTP {status}", self._retry_after(response))
        text = self._message(response)
        problem = account_problem(status, text)
        message = f"{self.display} refused the {what}: HTTP {status} {text}" + (f" ({problem})" if problem else "")
        raise Refused(message, status, every_row=problem is not None, until=_MENDED_WHEN.get(problem or ""))

    def _retry_after(self, response: httpx.Response) -> float | None:
        """How long the service asks us to wait: its Retry-After, or after a 429 without one,
        how long it is documented to keep the key timed out."""
        asked = retry_after(response)
        if asked is None and response.status_code == 429:
            return self.config.pause_after_429
        return asked

    def _message(self, response: httpx.Response) -> str:
        try:
            data = response.json()
            text = _error_text(data) or response.text
        except ValueError:
            text = response.text
        return self._redact(str(text)).strip()[:300]

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _on_retry(self, request: InpaintRequest, what: str):
        def report(attempt: int, exc: Retryable, wait: float) -> None:
            request.tell("retry", step=what, attempt=attempt, reason=self._redact(str(exc)), wait=round(wait, 2))

        return report

    def _in_doubt(self, happened: str, attempts: int, prediction_id: str | None = None) -> PredictionFailed:
        """The request may have reached the provider and made a prediction: counted as spent,
        never sent again. `happened`: what the create request did ("got no answer (...)")."""
        return PredictionFailed(
            f"The create request to {self.display} {happened}; it may have been created, "
            "so it is counted as spent and not sent again",
            self.price_usd,
            prediction_id,
            attempts,
            in_doubt=True,
        )


def _error_text(data: Any) -> str:
    """The human part of a provider's error body, whichever of the usual shapes it has."""
    if not isinstance(data, dict):
        return ""
    for key in ("message", "error", "detail"):
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, list) and value:  # FastAPI-style validation details
            return "; ".join(str(v.get("msg", v)) if isinstance(v, dict) else str(v) for v in value)
    errors = data.get("errors")  # Stability: {"name": ..., "errors": [...]}
    if isinstance(errors, list) and errors:
        return f"{data.get('name', 'error')}: " + "; ".join(str(e) for e in errors)
    return ""


MAX_RETRY_AFTER_SECONDS = 300.0  # a longer wait asked for is waited this long, then tried again


def retry_after(response: httpx.Response, now: float | None = None) -> float | None:
    """The seconds a Retry-After asks for: a number of seconds, or an HTTP date (RFC 9110),
    as some gateways send; None without one (or one that is neither)."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # an HTTP date is in GMT, whether or not it says so
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(MAX_RETRY_AFTER_SECONDS, max(0.0, seconds))


def json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        raise RowError(f"the provider answered with something that is not JSON: {response.text[:120]!r}") from None
    if not isinstance(data, dict):
        raise RowError("the provider answered with JSON that is not an object")
    return data


@contextmanager
def paid(cost: float, prediction_id: str | None, attempts: int) -> Iterator[None]:
    """Whatever fails once a prediction is paid for fails as PredictionFailed with its
    cost: the ledger keeps the money, whatever the error. It is collectable: the next
    attempt tries the same prediction (or its kept answer) again instead of a new one."""
    try:
        yield
    except PredictionFailed:
        raise
    except RowError as exc:
        raise PredictionFailed(str(exc), cost, prediction_id, attempts, collectable=True) from None
    except Exception as exc:
        which = f"prediction {prediction_id}" if prediction_id else "the prediction"
        raise PredictionFailed(
            f"The result of {which} could not be used ({type(exc).__name__}: {exc})",
            cost,
            prediction_id,
            attempts,
            collectable=True,
        ) from None


def capped_body(response: httpx.Response) -> bytes:
    """A result's bytes, refused past MAX_RESULT_BYTES (announced or counted)."""
    declared = int(response.headers.get("content-length") or 0)
    if declared > MAX_RESULT_BYTES:
        raise RowError(f"the result is {declared / 1e6:.0f} MB, over the download limit")
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > MAX_RESULT_BYTES:
            raise RowError("the result is over the download limit")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_result(data: bytes) -> tuple[Any, int]:
    try:
        samples, rate = soundio.read(data, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        raise RowError("the result is not audio that can be decoded") from None
    if len(samples) == 0:
        raise RowError("the result holds no audio")
    return samples, rate
