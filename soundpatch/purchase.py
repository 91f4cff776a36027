"""Getting a row its prediction, paid for once and never twice.

A create goes out only once its price is reserved on the ledger (limits.py): a row the
budget does not allow is `skipped_budget`, not sent. What an earlier attempt of this run
paid for (a prediction to poll, an answer kept on disk), and what a run that stopped left
uncollected (a run of this machine: left_here.py; of any machine writing the same bucket:
edit_claims.py), is collected at no new cost rather than made again; and so is a model's
answer kept with the results for a row that asks for it again with other damaged spans
(kept_answers.py). A create that went out
and was never answered may exist and is counted as spent: its edit is not sent again unless
`provider.resubmit_in_doubt` says so. Whatever happens to the create, what it owes stays
on the ledger and the row, and what it made is kept for the next attempt until the row's
result is out (`unused`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from soundpatch.answers import AnswerShelf
from soundpatch.config import Config
from soundpatch.disk_room import Promise
from soundpatch.edit_claims import BucketClaims
from soundpatch.errors import RowError, SoundpatchError
from soundpatch.identity import answer_identity, edit_identity
from soundpatch.journal import Journal, RowState
from soundpatch.kept_answers import KeptAnswers
from soundpatch.left_here import LeftHere
from soundpatch.leftovers import Left, Leftovers
from soundpatch.limits import BudgetLedger, Reservation
from soundpatch.markup import Markup
from soundpatch.outcome import SKIPPED_BUDGET
from soundpatch.providers import (
    InpaintRequest,
    NotStarted,
    OutOfReach,
    PaidAnswer,
    Prediction,
    PredictionFailed,
    Provider,
    RoomGone,
)
from soundpatch.row import RowWork

log = logging.getLogger("soundpatch")


class Purchases:
    """A run's predictions as money: the ones it sends, collects and keeps."""

    def __init__(
        self,
        config: Config,
        run_id: str,
        ledger: BudgetLedger,
        journal: Journal,
        answers: AnswerShelf,
        markup: Markup,
        held: dict[str, Reservation],
        *,
        leftovers: Leftovers | None,
        doubts_here: LeftHere,
        bucket_claims: BucketClaims | None,
        kept_answers: KeptAnswers | None,
        earlier_attempt: Callable[[str, str, str], RowState | None],
        maker: Callable[[RowState, Provider], Provider],
        may_start: Callable[[], bool],
        not_started: Callable[[], str],
        should_cancel: Callable[[], bool],
    ) -> None:
        """`held`: what earlier attempts paid for and rows still have to collect, by row,
        reserved on the ledger. `earlier_attempt(row, request, sent)`: what an earlier attempt
        of this run left of the row for this request (or one sent the same: identity.py);
        `kept_answers`: None under --force. `maker(state, provider)`: the provider
        that made it. `may_start()`: whether a new prediction may go out now, and
        `not_started()` the row's reason when not; `should_cancel()`: whether predictions
        in flight are to be cancelled (provider.on_interrupt)."""
        self.config = config
        self.run_id = run_id
        self.ledger = ledger
        self.journal = journal
        self.answers = answers
        self.markup = markup
        self.held = held
        self._leftovers = leftovers
        self.doubts_here = doubts_here
        self.bucket_claims = bucket_claims
        self.kept_answers = kept_answers
        self._earlier_attempt = earlier_attempt
        self._maker = maker
        self._may_start = may_start
        self._not_started = not_started
        self._should_cancel = should_cancel
        # Rows holding a paid prediction their result is not out of yet (not published, nor
        # kept unpublished): should the row fail, it is kept for the next attempt.
        self.unused: dict[str, dict[str, Any]] = {}
        # Rows whose create went out this attempt (the provider told "creating"), with the
        # prediction's id once it is known: what an unforeseen error then leaves owed.
        self._sent: dict[str, str] = {}

    @property
    def clip_settings(self) -> dict[str, Any]:
        """How a row's clip is cut around its region for the provider (window.py)."""
        return {"context_seconds": self.config.provider.context_seconds, "pad": self.config.provider.pad}

    def prediction(self, work: RowWork, room: Promise) -> tuple[Prediction, Provider] | None:
        """A new prediction for the row's region, or the one an earlier attempt paid for
        (then `made_for` takes the identity it was made under), with what it cost on the
        ledger and the row; None if the budget does not allow it. A new one is sent only
        once `room` is made sure of on disk for its result."""
        edit, made_for, outcome = work.edit, work.made_for, work.outcome
        provider = work.checked.provider
        claimed = made_for["identity"]  # what the row's claims are on
        state = self._earlier_attempt(edit.row_id, made_for["request"], made_for["sent"])
        if state is not None and state.settled and self.config.provider.resubmit_unusable:
            self._give_up_unusable(edit.row_id)
            state = None
        if state is not None and (state.in_doubt or state.doubted) and not self.config.provider.resubmit_in_doubt:
            if self.bucket_claims is not None:  # as it did for the runs on other machines
                self.bucket_claims.keep_doubt(claimed, self.run_id)
            raise RowError(
                "A create for this row went out in an earlier attempt that ended before its result was kept; "
                "the prediction may exist and is counted as spent (set provider.resubmit_in_doubt: true to send "
                "it again)"
            )
        left = None  # another run's prediction: its claim named it, or its journal here
        if self._leftovers is not None and (state is None or not (state.prediction_id or state.answer)):
            left = self._leftovers.left_by(claimed)
            collected = self._left_to_collect(edit.row_id, left, claimed) if left is not None else None
            if collected is None:  # (a kept answer gone since: nothing of that run's to fall back on)
                left = None
            else:
                state = collected
        offered_by: Leftovers | None = self._leftovers if left is not None else None
        if left is None and (state is None or not (state.prediction_id or state.answer)):
            left, collected = self._kept_with_results(work, provider, claimed)
            if collected is not None:
                state, offered_by = collected, self.kept_answers
        settled = state is not None and state.settled  # collected at no new cost: counted already
        resume_id = state.prediction_id if state is not None else None
        kept = self.answers.load(state.answer) if state is not None else None
        clip = self.clip_settings
        resent: list[str] = []  # stopped runs' creates in doubt for this edit that it sends again
        if state is not None and (resume_id or kept):
            provider = self._maker(state, provider)
            outcome.provider = provider.name
            reservation = self.held.pop(edit.row_id)  # paid already: collect it, never recreate
            clip = state.clip or clip  # cut as it was sent, even if the settings changed since
            if state.request in (None, made_for["request"]):
                made_for["identity"] = state.identity or made_for["identity"]
            else:  # sent the same, for other damaged spans: the result is of the spans asked now
                made_for["identity"] = self._identity(work, provider, clip)
        else:
            resent = self._doubted_elsewhere(claimed)
            # Waits while rows in flight hold the room it lacks; raises RowError when it cannot have it.
            waiting = lambda: self.journal.write("waiting_for_disk", edit.row_id)  # noqa: E731 - for the progress line
            if not room.make(give_up=lambda: not self._may_start(), waiting=waiting):
                raise RowError(self._not_started())
            # Waits while predictions in flight hold what it lacks (they may cost less).
            reservation = self.ledger.reserve(
                provider.price_usd,
                give_up=lambda: not self._may_start(),
                waiting=lambda: self.journal.write("waiting_for_budget", edit.row_id),  # for the progress line
                provider=provider.name,
            )
            if reservation is None and not self._may_start():
                raise RowError(self._not_started())
        work.answer = answer_identity(made_for["sent"], provider.name, provider.model, clip)
        if reservation is None:
            outcome.status = SKIPPED_BUDGET
            outcome.error = (
                f"Budget of ${self.ledger.budget_usd:.2f} reached ({self.ledger.standing()}); this row was not sent."
            )
            return None
        request = InpaintRequest(
            work.original,
            work.a,
            work.b,
            edit.prompt,
            edit.seed,
            edit.steps,
            edit.guidance_scale,
            damaged=work.damaged,
            source=work.checked.source,
            staging_folder=self.run_id,
            notify=lambda event, fields: self._told(edit.row_id, claimed, provider.name, event, fields),
            resume_prediction_id=resume_id,
            kept_answer=kept,
            context_seconds=clip["context_seconds"],
            pad=clip["pad"],
            keep_answer=lambda answer: self._keep_answer(edit.row_id, answer),
            should_cancel=self._should_cancel,
            may_start=self._may_start,
            room_gone=room.gone,
        )
        try:
            self.journal.write(
                "sending",
                edit.row_id,
                provider=provider.name,
                request=made_for["request"],
                sent=made_for["sent"],
                identity=made_for["identity"],
                clip=clip,
                **({"settled": True} if settled else {}),
                **({"resent_doubt": resent} if resent else {}),
            )
        except BaseException:  # not recorded, so not sent
            if reservation.in_flight:  # reserved for it here: rows waiting on the budget count on this
                self.ledger.release(reservation)
            raise
        if resume_id:
            # (Another run's, `from_run`: tried once here, not offered to later runs again: left_here.py.)
            taken_up = {"prediction_id": resume_id, "resumed": True, **({"from_run": left.run} if left else {})}
            self._told(edit.row_id, claimed, provider.name, "created", taken_up)
        if kept is not None and state is not None:  # still kept, should this attempt die too
            # (Another run's, `from_run`: taken up once, as its predictions are: left_here.py.)
            taken = {"from_run": left.run, "from_file": left.answer.get("file")} if left and left.answer else {}
            self.journal.write("answer_kept", edit.row_id, **(state.answer or {}), resumed=True, **taken)
        if not (resume_id or kept):  # a create goes out (collecting what was paid for sends none)
            outcome.attempts += 1
        self._sent.pop(edit.row_id, None)
        try:
            prediction = provider.inpaint(request)  # holds one of limits.concurrency slots while in flight
        except PredictionFailed as exc:
            # The provider was reached and may have charged: keep what it says is owed.
            owed = 0.0 if settled else exc.cost_usd
            if exc.in_doubt and self.bucket_claims is not None:  # for runs on other machines to see
                self.bucket_claims.keep_doubt(claimed, self.run_id)
            self._settle(reservation, owed, provider, seen=False)  # (what a failure owes: not a price seen)
            # (A kept answer that will not do is not kept for the row's next attempt either.)
            unusable = exc.unseen or not exc.collectable or offered_by is self.kept_answers
            if left is not None and offered_by is not None and unusable and self._may_start():
                self._not_collected(edit.row_id, left, exc, offered_by)  # ... and made here, in this same attempt
                return self.prediction(work, room)
            outcome.cost_usd += owed
            outcome.provider_cost_usd += owed
            outcome.prediction_id = exc.prediction_id or ""
            outcome.attempts = max(outcome.attempts, exc.attempts)
            if exc.collectable:
                self.unused[edit.row_id] = _unused(exc.prediction_id or resume_id, exc.cost_usd, settled)
            raise
        except OutOfReach as exc:
            self.ledger.release(reservation)
            outcome.attempts = max(outcome.attempts - 1, exc.sent)  # counts creates sent, not turns
            again = f"run it again with --run-id {self.run_id} once {exc.until}"
            raise RowError(f"{exc}; no more are sent this run: {again}") from None
        except NotStarted as exc:
            self.ledger.release(reservation)
            outcome.attempts = max(outcome.attempts - 1, exc.sent)
            raise RowError(str(exc) if isinstance(exc, RoomGone) else self._not_started()) from None
        except BaseException:
            sent = self._sent.get(edit.row_id)
            if sent is None and reservation.in_flight:
                # Refused before a prediction existed (or never sent): nothing is owed.
                self.ledger.release(reservation)
                raise
            # Something unforeseen (a fault of ours) ended the row once its create went out,
            # or while it collected an earlier attempt's: owed as a create in doubt is, and
            # what it made (its id, or its answer kept on disk) is kept for the next attempt.
            owed = 0.0 if settled else reservation.amount_usd
            self.ledger.settle(reservation, owed, seen=False)
            outcome.cost_usd += owed
            self.unused[edit.row_id] = _unused(sent or resume_id, reservation.amount_usd, settled)
            raise
        finally:
            self._sent.pop(edit.row_id, None)
        paid_now = 0.0 if settled else prediction.cost_usd
        self._settle(reservation, paid_now, provider)
        if left is not None and offered_by is not None:
            offered_by.was_collected(left)
        outcome.cost_usd += paid_now
        outcome.provider_cost_usd += paid_now
        outcome.prediction_id = prediction.prediction_id or ""
        outcome.method = prediction.method
        if left is not None and offered_by is self.kept_answers:
            work.answer_from = left.run
            paid_by = self.kept_answers.paid_by({left.run: 1})
            outcome.method += f"; from the answer {paid_by} paid for, kept with the results: no new cost"
        outcome.attempts = max(outcome.attempts, prediction.attempts)
        self.journal.write("predicted", edit.row_id, prediction_id=outcome.prediction_id, cost_usd=prediction.cost_usd)
        # Until its result is out, a failure keeps the prediction for the next attempt.
        self.unused[edit.row_id] = _unused(prediction.prediction_id or resume_id, prediction.cost_usd, settled)
        return prediction, provider

    def _doubted_elsewhere(self, identity: str) -> list[str]:
        """The runs that sent a create for this edit and never heard back (stopped runs of
        this machine: left_here.py; of any machine, as the edit's claim in the output bucket
        says: edit_claims.py), whose doubt this row sends again as told to
        (provider.resubmit_in_doubt); a RowError, at no cost, when not told to."""
        runs = list(self.doubts_here.doubted_by(identity))
        elsewhere = self.bucket_claims.doubted_by(identity) if self.bucket_claims is not None else ""
        runs += [elsewhere] if elsewhere and elsewhere not in runs else []
        if runs and not self.config.provider.resubmit_in_doubt:
            self.doubts_here.not_sent(runs[0])
            if self.bucket_claims is not None:  # the edit's claim in the bucket says so to every run after
                self.bucket_claims.keep_doubt(identity, runs[0])
            raise RowError(
                f"A create for this edit went out in run {runs[0]} and its answer never came; the prediction may "
                "exist and is counted as spent there (set provider.resubmit_in_doubt: true to send it again)"
            )
        if elsewhere:
            self.bucket_claims.no_longer_doubted(identity)
        return runs

    def _settle(self, reservation: Reservation, cost_usd: float, provider: Provider, seen: bool = True) -> None:
        """Settle the row's reservation at what its prediction cost (`seen`: as its provider
        charged it); a provider found charging more than the price reserved is said once, as
        it happens (markup.py)."""
        self.ledger.settle(reservation, cost_usd, seen=seen)
        dearer = self.markup.charged(provider.name, reservation.amount_usd, cost_usd)
        if dearer is not None:
            log.warning("%s", dearer)

    def _told(self, row_id: str, claimed: str, provider: str, event: str, fields: dict[str, Any]) -> None:
        """What the provider reports as the row goes, journaled; a prediction made (or taken
        up again) is named on the row's claim in the output bucket too, for a run that
        would take the claim over should this machine die."""
        self.journal.write(event, row_id, **fields)
        if event == "creating":
            self._sent.setdefault(row_id, "")
        elif event == "create_refused" and not self._sent.get(row_id):
            self._sent.pop(row_id, None)  # turned away: nothing was made
        elif event == "created":
            self._sent[row_id] = str(fields.get("prediction_id") or "")
        if event == "created" and self.bucket_claims is not None and fields.get("prediction_id"):
            self.bucket_claims.made(claimed, str(fields["prediction_id"]), provider)

    def _left_to_collect(self, row_id: str, left: Left, identity: str) -> RowState | None:
        """The prediction a run whose machine died had made for this edit (its claim, taken
        over, named it), or a run of this machine that stopped (its journal): collected as this
        row's at no new cost (that run paid for it). A paid answer that run kept on disk (no
        id to collect by) is copied into this run's answers first; None if it is gone."""
        answer = None
        if left.answer:
            paid = left.paid or AnswerShelf(Path(self.config.runs_dir).expanduser() / left.run).load(left.answer)
            if paid is None:
                return None  # used by that run since (its rerun), or removed: nothing to collect
            try:
                answer = self.answers.keep(row_id, paid)
            except OSError as exc:
                raise RowError(
                    f"The answer run {left.run} paid for and kept could not be copied into this run's folder "
                    f"({type(exc).__name__}: {exc}); nothing was sent: run {left.run} again with its --run-id "
                    "to finish the edit from it"
                ) from None
        self.held[row_id] = self.ledger.hold(0.0)
        return RowState(
            provider=left.provider or None,
            prediction_id=left.prediction_id or None,
            answer=answer,
            settled=True,
            identity=identity,
        )

    def _not_collected(self, row_id: str, left: Left, exc: PredictionFailed, offered_by: Leftovers) -> None:
        """The prediction another run had made for this edit failed, or this key cannot see
        it (another account's), or the answer kept with the results will not do: there is
        nothing to collect, and the row pays for its own."""
        offered_by.not_collected(left)
        self.journal.write("not_collected", row_id, prediction_id=left.prediction_id, reason=str(exc)[:300])

    def _kept_with_results(
        self, work: RowWork, provider: Provider, claimed: str
    ) -> tuple[Left | None, RowState | None]:
        """The model's answer kept with the results for what the row sends (kept_answers.py),
        to collect at no new cost (it comes to the row as another run's prediction left
        does: `_left_to_collect`); (None, None) if none is kept, or cannot be had."""
        row_id, answer = work.edit.row_id, self.answer_looked_for(work.made_for["sent"], provider)
        left = self.kept_answers.find(answer, row_id) if self.kept_answers is not None and answer is not None else None
        collected = self._left_to_collect(row_id, left, claimed) if left is not None else None
        return (left, collected) if collected is not None else (None, None)

    def answer_looked_for(self, sent: str, provider: Provider) -> str | None:
        """The answer identity a row sending `sent` to `provider` looks for among the answers
        kept with the results (as a run does, and an estimate counts); None where it looks
        for none (--force, the local engine)."""
        if self.kept_answers is None or not provider.hosted:
            return None
        return answer_identity(sent, provider.name, provider.model, self.clip_settings)

    def keep_with_results(self, work: RowWork, prediction: Prediction, provider: Provider) -> None:
        """The model's answer a row with damaged spans (or one another row of this run asks for)
        was made from, kept with the results once its result is out (kept_answers.py), unless it
        came from there. A store that will not take it costs the row nothing: the journal says so."""
        if self.kept_answers is None or not provider.hosted or not work.answer:
            return
        if not self.kept_answers.wanted(work.edit.row_id, bool(work.damaged)):
            return
        if work.answer_from:
            return
        row_id = work.edit.row_id
        try:
            data = self.answers.file_for(row_id).read_bytes()
        except OSError:
            return  # never kept on disk (answer_not_kept): it was used as it came
        try:
            paid = PaidAnswer(data, prediction.cost_usd, prediction.prediction_id)
            self.kept_answers.keep(work.answer, provider.name, paid)
        except (SoundpatchError, OSError) as exc:
            self.journal.write("answer_not_kept_with_results", row_id, reason=f"{type(exc).__name__}: {exc}"[:300])

    def _identity(self, work: RowWork, maker: Provider, clip: dict[str, Any]) -> str:
        """The row's identity as `maker` made it, cut with `clip` (identity.py)."""
        edit, sha = work.edit, work.made_for["source_sha256"]
        return edit_identity(edit, sha, maker.name, maker.model, self.config, clip)

    def _give_up_unusable(self, row_id: str) -> None:
        """provider.resubmit_unusable: the paid prediction earlier attempts could not use is
        given up (what it cost stays on the row) and a new one is made."""
        held = self.held.pop(row_id, None)
        if held is not None:
            self.ledger.release(held)  # it held nothing: the price is in the row's earlier outcome
        self.answers.discard(row_id)
        self.journal.write("set_aside", row_id, reason="its paid prediction could not be used (resubmit_unusable)")

    def _keep_answer(self, row_id: str, answer: PaidAnswer) -> None:
        """A paid answer on disk before it is used (see soundpatch/answers.py). A disk that
        will not take it does not stop the row: the answer is used all the same, only
        unprotected from a crash meanwhile."""
        try:
            kept = self.answers.keep(row_id, answer)
        except OSError as exc:
            self.journal.write("answer_not_kept", row_id, reason=f"{type(exc).__name__}: {exc}")
            return
        self.journal.write("answer_kept", row_id, **kept)


def _unused(prediction_id: str | None, cost_usd: float, again: bool) -> dict[str, Any]:
    """A paid prediction a row holds and has not used yet (Purchases.unused); `again`: an
    earlier attempt already failed using it."""
    return {"prediction_id": prediction_id, "cost_usd": cost_usd, "again": again}
