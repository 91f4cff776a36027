"""One batch run: each edit's journey from manifest row to published result.

    validate (no network, no money)  -> invalid + reason
    reserve the price in the ledger  -> skipped_budget
    decode the source (once per source), inpaint the region, splice it into the original
    encode, publish under output.uri, journal the outcome

`Batch.process` never raises: whatever goes wrong becomes that row's outcome with one
sentence saying why, and the rest of the batch goes on. Orchestration (Prefect) lives in
flows/ and tasks/; this module is plain Python.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

from soundpatch import audio as audio_ops
from soundpatch import dataset_index, tls, web
from soundpatch.answers import AnswerShelf
from soundpatch.audio import Audio, AudioInfo
from soundpatch.combine import CombinedFile, Combiner, combined_note
from soundpatch.config import MENDING_DAMAGED, Config
from soundpatch.disk_room import FULL_ERRNOS, DiskRoom, Promise, full_disk
from soundpatch.earlier_attempts import read_earlier_attempts
from soundpatch.edit_claims import BucketClaims
from soundpatch.edits import MAX_DAMAGED_SECONDS, Edit, spans_text
from soundpatch.errors import ConfigError, RowError, SoundpatchError, as_sentence, sentence_of
from soundpatch.estimate import estimate
from soundpatch.humanize import plural
from soundpatch.humanize import size as human_size
from soundpatch.identity import edit_identity, request_identity, sent_identity
from soundpatch.interrupt import stop_requested
from soundpatch.journal import Journal, RowState
from soundpatch.journal_copy import JournalCopy
from soundpatch.kept_answers import KeptAnswers, asked_again
from soundpatch.lease import RunLease, lease_uri
from soundpatch.left_here import LeftHere
from soundpatch.leftovers import Leftovers
from soundpatch.limits import BudgetLedger, SharedLimits
from soundpatch.locks import CLAIMED, STOPPED, WAITED, Claims, RunLock
from soundpatch.manifest import Manifest, lookalike_notes
from soundpatch.markup import Markup
from soundpatch.memory_room import MemoryRoom, NotAdmitted, default_limit_bytes
from soundpatch.outcome import FAILED, INVALID, NOT_STARTED, SKIPPED_DONE, SUCCEEDED, Outcome
from soundpatch.providers import (
    Provider,
    make_provider,
)
from soundpatch.providers.hosted import MAX_RESULT_BYTES
from soundpatch.publish import Publisher
from soundpatch.purchase import Purchases
from soundpatch.results import KeptUnpublished, Results
from soundpatch.row import Checked, RowWork
from soundpatch.runs_folder import SCRATCH_DIR, clear_stopped_runs_scratch
from soundpatch.s3 import S3, NoConditionalWrites, S3Uri
from soundpatch.source_records import SourceRecords
from soundpatch.sources import HEADERS_AT_ONCE, SourceReader, remote
from soundpatch.splicing import Splicer
from soundpatch.storage import LocalFolder, OutputStore, S3Prefix, open_store
from soundpatch.window import answer_bytes_bound

log = logging.getLogger("soundpatch")


def preflight(config: Config) -> None:
    """Fail before anything starts if the provider or the output store cannot work (no key,
    no staging, a missing bucket, wrong credentials)."""
    s3 = S3(config.storage.s3)
    make_provider(config, s3=s3).ready()
    open_store(config.output.uri, s3).ready()


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def _region_in(edit: Edit, info: AudioInfo) -> tuple[int, int]:
    """The edit's region as frames of its recording (`info`): raises RowError where the
    recording does not hold it."""
    assert edit.start is not None and edit.end is not None
    name = Path(web.shown_input(edit.input)).name
    length = f"is only {info.duration:.3f} s long"
    if info.promised_frames:  # cut short (0: a header never finished, which said nothing of its length)
        length = (
            f"breaks off at {info.duration:.3f} s of the {info.promised_frames / info.rate:.3f} s its header promises"
        )
    if edit.start >= info.duration:
        raise RowError(f"region starts at {edit.start:g} s but {name} {length}")
    if edit.end > info.duration + 0.5 / info.rate:  # (half a sample)
        raise RowError(f"region ends at {edit.end:g} s but {name} {length}")
    a, b = audio_ops.region_frames(edit.start, edit.end, info.rate, info.frames)
    if b <= a:
        raise RowError(f"region {edit.start:g}-{edit.end:g} s is shorter than one sample")
    return a, b


class Batch:
    def __init__(
        self,
        manifest: Manifest,
        config: Config,
        run_id: str,
        force: bool = False,
        dry_run: bool = False,
        api_keys: dict[str, str] | None = None,
        shared: Callable[[str], SharedLimits] | None = None,
        earlier_attempts: bool = False,
        rows: Sequence[str] = (),
    ) -> None:
        """`shared(provider)`: the limits shared with other processes on that provider's
        account, if they are. `earlier_attempts`: a dry run reads what earlier attempts of
        this run id left (to estimate what resuming it costs) only when asked to; a run
        always does. `rows`: only the rows whose ids match these patterns (a trial of a few)."""
        self.api_keys = api_keys or {}
        self.shared = shared  # limits shared with other processes on each provider's account, if any
        self.config = config
        self.run_id = run_id
        self.force = force
        self.run_dir = Path(config.runs_dir).expanduser() / run_id
        # One process per run id (its journal is the truth about what is paid for), taken
        # before the journal is read; one producer per edit among this machine's processes.
        self.run_lock = RunLock(self.run_dir)
        self.lease: RunLease | None = None  # ... and one machine, when the outputs are in a bucket
        if not dry_run:
            self.run_lock.acquire()
        try:
            self._open(manifest, config, run_id, dry_run, earlier_attempts or not dry_run, rows)
        except BaseException:
            if self.lease is not None:
                self.lease.give_back()
            self.run_lock.release()  # nothing will run: the run is free again
            raise

    def _open(
        self,
        manifest: Manifest,
        config: Config,
        run_id: str,
        dry_run: bool,
        earlier_attempts: bool,
        rows: Sequence[str],
    ) -> None:
        self.claims = Claims(config.output.uri)
        self.answers = AnswerShelf(self.run_dir)  # paid answers in use, kept until their outcome
        self.dry_run = dry_run
        self.s3 = S3(config.storage.s3, connections=max(self.rows_at_once, HEADERS_AT_ONCE) + 4)
        self.providers: dict[str, Provider] = {}
        self._lock = threading.Lock()
        self.store: OutputStore = open_store(config.output.uri, self.s3)
        # With the outputs in a bucket, the journal is copied there: a run resumes elsewhere.
        in_bucket = isinstance(self.store, S3Prefix)
        self.journal_copy = JournalCopy(self.s3, self.store.prefix, run_id) if in_bucket else None
        self._no_lease = ""  # why the run holds no lease, for the notes
        # Recordings rows hold decoded, within limits.inputs_memory_mb (memory_room.py).
        limit_mb = config.limits.inputs_memory_mb
        self.memory = MemoryRoom(int(limit_mb * 2**20) if limit_mb else default_limit_bytes())
        self.sources = SourceReader(self.s3, config.storage, room=self.memory)
        self.source_records = SourceRecords(self.store, self.sources)
        self.manifest = manifest.with_patterns_expanded(self.sources.glob)
        # Every row of the manifest, in its order: the run's report holds those --rows leaves out too.
        self.row_order = [e.row_id for e in self.manifest.edits]
        if rows:  # (ids are known once patterns are expanded: `old-take1`)
            self.manifest = self.manifest.only(rows)
        # What its remote recordings are, read at once where asked before any row starts (by
        # validate and --dry-run for every row; for rows in a recording's own timecode), rather
        # than one after another. A run's rows ask as each starts, several at once themselves.
        self.sources.read_headers(
            self.manifest.resolve_input(e)
            for e in self.manifest.edits
            if not e.error and (dry_run or e.source_timecode)
        )
        # Times given as a recording's own timecode, counted from its first sample from here on.
        self.manifest = self.manifest.with_times_from_stamps(self.sources.time_stamp)
        # Damaged spans as a hosted model's audio goes into them: with the splice's crossfades.
        self.manifest = self.manifest.with_damaged_for_models(
            lambda edit: (edit.provider or config.provider.name) not in MENDING_DAMAGED,
            config.splice.crossfade_ms / 1000,
        )
        tls.verify()  # a CA bundle (SSL_CERT_FILE) that cannot be read: before any row, in one sentence
        self.provider_named(config.provider.name)  # an unusable provider stops the run before it starts
        if not dry_run:
            self.store.ready()  # a missing bucket or unwritable folder: once, before any row
            if self.journal_copy is not None:  # before its journal is read: no one else goes on with it
                self.lease = self._take_lease()
        self.bucket_claims = (
            BucketClaims(self.s3, self.store.prefix, run_id, config.storage.s3.lease_seconds, self.lease.holds)
            if self.lease is not None
            else None
        )
        # A dry run claims nothing, and reads what the edits' claims would tell the run (estimate.py).
        self.claims_seen = (
            BucketClaims(self.s3, self.store.prefix, run_id, config.storage.s3.lease_seconds, lambda: False)
            if dry_run and in_bucket
            else None
        )
        # What earlier attempts of this run left (journal.py), and what the start made of the
        # journal's copy in the bucket, for the notes.
        self.states, self._copy_read = (
            read_earlier_attempts(self.run_dir, run_id, self.journal_copy, self.answers, restore_here=not dry_run)
            if earlier_attempts
            else ({}, "")
        )
        # Predictions runs of this machine that stopped had paid for and not used: a row of the
        # same edit collects one rather than paying again (left_here.py). With the outputs in a
        # bucket, the claims there name them (edit_claims.py); --force asks for new ones.
        # What they sent and never heard back from holds whatever the outputs and --force: a
        # row of such an edit is not sent unless provider.resubmit_in_doubt says to.
        self.doubts_here = LeftHere(Path(config.runs_dir).expanduser(), run_id)
        self.left_here = self.doubts_here if self.bucket_claims is None and not self.force else None
        self._leftovers: Leftovers | None = self.bucket_claims if self.bucket_claims is not None else self.left_here
        # A model's answers that rows with damaged spans were made from, kept with the results
        # for rows asking for them again with other spans (kept_answers.py); --force pays anew.
        # Rows of this manifest sending the same with other spans share one (asked_again).
        provider_of = lambda e: e.provider or config.provider.name  # noqa: E731
        twins = asked_again(self.manifest.edits, self.manifest.resolve_input, provider_of)
        self.kept_answers = None if self.force else KeptAnswers(self.store, run_id, MAX_RESULT_BYTES, twins)
        # Identity (or, for a row that would look for a kept answer, the answer identity: rows
        # sending the same share one) -> set when the row producing it is done.
        self._in_flight: dict[str, threading.Event] = {}
        # Results are encoded into files here until published (publish.py); what a run that
        # stopped left there is of no use to anyone.
        self.scratch = self.run_dir / SCRATCH_DIR
        self._cleared: tuple[list[str], int] = ([], 0)  # runs whose scratch folder was cleared, and bytes
        if not dry_run:
            shutil.rmtree(self.scratch, ignore_errors=True)
            # ... nor what runs that stopped and never went on left in theirs (disk_room.py counts free space).
            self._cleared = clear_stopped_runs_scratch(self.run_dir.parent)
        self.publisher = Publisher(self.store, config.output.format, run_id, self.scratch)
        # Results by identity: in the output store, or kept here after their upload failed.
        self.results = Results(self.store, self.publisher, Path(config.runs_dir).expanduser(), self.run_dir)
        # Room for each result on the disks it is written to, made sure of before it is paid for.
        outputs = self.store.root if isinstance(self.store, LocalFolder) else None
        self.room = DiskRoom(self.run_dir.parent if dry_run else self.scratch, outputs)  # a dry run's id is made up
        self._name_clashes = self.publisher.clashes(self.manifest.edits, self._info_if_readable)
        self._edits = {e.row_id: e for e in self.manifest.edits}  # by row id
        self._combined: list[CombinedFile] = []  # the files rows of one recording share, once made
        self._index_note: list[str] = []  # why the dataset's index was not updated
        self.index_uri: str | None = None  # the dataset's index, once this run's results are in it
        self.changed_rows: list[str] = []  # rows an earlier attempt finished, changed since
        self._set_aside: list[str] = []  # rows an earlier attempt paid for, changed since
        self._kept_paid: list[str] = []  # rows that failed using a paid prediction, kept for a rerun
        # A prediction made into the row's result, checked and published (splicing.py).
        self.splicer = Splicer(
            config.splice.crossfade_ms,
            self.publisher,
            self.results,
            run_id,
            self.run_dir,
            self.manifest.edits,
            self._log_traceback,
        )
        self._carried = self._carried_outcomes()
        self.left_out = self._left_out() if rows else []
        # Money an earlier attempt of this run spent or committed counts against the cap:
        # recorded costs, creates in doubt (at list price), predictions still to collect.
        # At each row's own provider's price: a manifest may mix providers.
        self._row_providers = {e.row_id: e.provider or config.provider.name for e in self.manifest.edits}
        spent = sum(s.spent_before for s in self.states.values())
        spent += sum(self._list_price(row) for row, s in self.states.items() if s.in_doubt)
        # (Providers whose prediction's cost an earlier attempt saw: limits.py.)
        seen = {name for s in self.states.values() for name, cost in s.charged.items() if cost > 0}
        self.ledger = BudgetLedger(config.limits.budget_usd, already_spent_usd=spent, costs_seen=seen)
        self._spent_before = spent
        # Providers that charged more than the price reserved, as earlier attempts of this run
        # found (counted from this attempt's first row on), and as this attempt finds.
        self.markup = Markup(run_id, config.provider.price_of, self.states.values())
        for name, (price, most) in self.markup.before.items():
            self.ledger.count_dearer(price, most, name)
        if not dry_run:
            for note in self.markup.notes_before():
                log.warning("%s", note)
        # Paid for and still to collect: a prediction to poll, or an answer kept on disk
        # (nothing more when a failed outcome counted it already).
        held = {
            row: self.ledger.hold(
                0.0 if s.settled else float(s.answer["cost_usd"] or 0.0) if s.answer else self._list_price(row),
                self._maker_name(row),
            )
            for row, s in self.states.items()
            if s.prediction_id or s.answer
        }
        self.journal = Journal(self.run_dir, None if dry_run else self.journal_copy)
        # Each row's prediction, paid for once (purchase.py).
        self.purchases = Purchases(
            config,
            run_id,
            self.ledger,
            self.journal,
            self.answers,
            self.markup,
            held,
            leftovers=self._leftovers,
            doubts_here=self.doubts_here,
            bucket_claims=self.bucket_claims,
            kept_answers=self.kept_answers,
            earlier_attempt=self._earlier_attempt,
            maker=self._maker,
            may_start=self._may_start,
            not_started=lambda: self._not_started,
            should_cancel=self._should_cancel,
        )
        # Rows run on many threads at once. BLAS's own threads on top of them fight for the
        # same cores: with 40 rows a dot product or a solve took 100-300x longer. One each.
        self._blas = threadpool_limits(limits=1, user_api="blas")

    # ------------------------------------------------------------------ planning

    def _take_lease(self) -> RunLease | None:
        """This machine's hold on the run (lease.py), or None where the store cannot do it."""
        uri = lease_uri(self.store.prefix, self.run_id)
        try:
            return RunLease(self.s3, uri, self.run_id, self.run_dir, self.config.storage.s3.lease_seconds).take()
        except NoConditionalWrites as exc:
            self._no_lease = (
                f"The output store does not do conditional writes ({exc}), so nothing keeps another machine "
                f"from running {self.run_id} at the same time."
            )
            return None

    def _carried_outcomes(self) -> dict[str, Outcome]:
        """Rows this run already finished (same --run-id): kept as they were, not redone,
        unless the row now asks for something else or its result was replaced since.
        Checked several rows at a time: in a bucket each check is a request or two."""
        finished = []
        for row_id, state in self.states.items():
            o = Outcome.from_dict(state.outcome) if state.outcome is not None and row_id in self._edits else None
            if o is not None and o.status in (SUCCEEDED, SKIPPED_DONE) and o.output:
                finished.append((self._edits[row_id], o, state.made_for or {}))

        def verdict(item: tuple[Edit, Outcome, dict]) -> str:
            edit, o, made_for = item
            if not self._still_asked(edit, made_for):
                return "changed"
            return "kept" if self.store.holds(o.output, made_for.get("identity")) else "gone"

        with ThreadPoolExecutor(max_workers=max(1, min(16, len(finished)))) as pool:
            verdicts = list(pool.map(verdict, finished))
        self.changed_rows.extend(
            edit.row_id for (edit, _, _), v in zip(finished, verdicts, strict=True) if v == "changed"
        )
        return {edit.row_id: o for (edit, o, _), v in zip(finished, verdicts, strict=True) if v == "kept"}

    def _left_out(self) -> list[Outcome]:
        """The rows of the manifest --rows leaves out of this attempt that an earlier attempt
        of the run ended, as it left them: the report is the run's (its spent counts them, as
        its budget does), not only this attempt's."""
        left_out = set(self.row_order) - set(self._edits)
        return [
            Outcome.from_dict(state.outcome)
            for row_id, state in self.states.items()
            if state.outcome is not None and row_id in left_out
        ]

    def _still_asked(self, edit: Edit, made_for: dict) -> bool:
        """Whether the row asks for what its earlier result was made for (identity.py): the
        same input content (known by its stamp when unchanged, not read again), region,
        prompt, seed and settings of its own."""
        if not made_for.get("request"):
            return True  # recorded before requests were: taken as it was
        if edit.error:
            return False  # the row as it stands now is not the row that was done
        try:
            source = self.manifest.resolve_input(edit)
            self.sources.vouch(source, made_for.get("source_stamp"), made_for.get("source_sha256") or "")
            checksum = self.sources.checksum(source)
        except (SoundpatchError, OSError):
            return True  # its input cannot be read now: the result is all there is of it
        return request_identity(edit, checksum) == made_for["request"]

    def attempt_for(self, row_id: str, request: str, sent: str) -> RowState | None:
        """What an earlier attempt of this run left of the row to collect or to doubt, if it
        was for this same request, or one sent the same (other damaged spans: identity.py).
        One for a request the row no longer makes (the manifest changed) is set aside: what
        it cost stays counted, and the row is made anew."""
        state = self.states.get(row_id)
        if state is None or state.request in (None, request) or state.sent == sent:
            return state
        return None

    def _earlier_attempt(self, row_id: str, request: str, sent: str) -> RowState | None:
        """`attempt_for`, saying so in the journal and the notes when an attempt is set aside."""
        attempt = self.attempt_for(row_id, request, sent)
        state = self.states.get(row_id)
        if (
            attempt is None
            and state is not None
            and (state.prediction_id or state.answer or state.in_doubt or state.doubted)
        ):
            self.journal.write("set_aside", row_id, reason="the row asks for something else than when it was sent")
            with self._lock:
                self._set_aside.append(row_id)
        return attempt

    @property
    def rows_at_once(self) -> int:
        """Rows worked on at once: twice the predictions allowed in flight, so that while
        those run, other rows prepare their clips or finish their results."""
        return 2 * self.config.limits.concurrency

    def split(self) -> tuple[list[Edit], list[Outcome]]:
        """(edits still to do, outcomes kept from an earlier attempt of this run)."""
        todo, kept = [], []
        for edit in self.manifest.edits:
            if edit.row_id in self._carried and not self.force:
                kept.append(self._carried[edit.row_id])
            else:
                todo.append(edit)
        return todo, kept

    def rows_by_provider(self, edits: list[Edit]) -> dict[str, int]:
        """How many of `edits` go to each provider (as the manifest and config name it)."""
        return dict(Counter(self._row_providers.get(edit.row_id, self.config.provider.name) for edit in edits))

    def _list_price(self, row_id: str) -> float:
        """What one prediction costs at the provider an earlier attempt of this row went to
        (else the row's own): creates in doubt and predictions still to collect count
        against the budget at it."""
        return self.config.provider.price_of(self._maker_name(row_id))

    def _maker_name(self, row_id: str) -> str:
        """The provider an earlier attempt of this row went to, else the row's own."""
        state = self.states.get(row_id)
        return (state.provider if state else None) or self._row_providers.get(row_id, self.config.provider.name)

    def _maker(self, state: RowState, provider: Provider) -> Provider:
        """The provider that made an earlier attempt's paid prediction: it alone can collect
        it, even when this run names another (the config or the row changed meanwhile)."""
        if not state.provider or state.provider == provider.name:
            return provider
        try:
            return self.provider_named(state.provider)
        except ConfigError as exc:
            raise RowError(
                f"The {state.provider} prediction an earlier attempt paid for cannot be collected: {exc}"
            ) from None

    def provider_named(self, name: str) -> Provider:
        with self._lock:
            if name not in self.providers:
                provider = make_provider(self.config, name, self.s3, self.api_keys.get(name), self.shared)
                if not self.dry_run:
                    provider.ready()  # a missing key or staging prefix: say so once, not on every row
                self.providers[name] = provider
            return self.providers[name]

    def provider_for(self, edit: Edit) -> Provider:
        try:
            return self.provider_named(edit.provider or self.config.provider.name)
        except ConfigError as exc:
            raise RowError(str(exc)) from None

    def check(self, edit: Edit) -> Checked:
        """Everything that can be known without spending: raises RowError with the reason."""
        if edit.error:
            raise RowError(edit.error)
        if edit.row_id in self._name_clashes:
            raise RowError(self._name_clashes[edit.row_id])
        provider = self.provider_for(edit)
        source = self.manifest.resolve_input(edit)
        info = self.sources.info(source)
        a, b = _region_in(edit, info)
        if edit.damaged and provider.name in MENDING_DAMAGED:
            # The local engine rebuilds its spans from the rest of the region (even a region over
            # the whole recording leaves that), by AR interpolation, which is for short spans.
            _spans_rebuilt_alone(edit)
        else:
            provider.check(info.frames, info.rate, a, b, edit.steps, edit.guidance_scale)
        self.store.uri(self.publisher.name(edit, info))  # an unusable output name is found now, not after paying
        self.publisher.check_encodable(info, edit)  # and an output format that cannot hold the audio
        return Checked(edit, source, info, provider)

    def _info_if_readable(self, edit: Edit) -> AudioInfo | None:
        try:
            return self.sources.info(self.manifest.resolve_input(edit))
        except (SoundpatchError, OSError):
            return None

    def estimate(self, edits: list[Edit]) -> dict[str, Any]:
        """What a run of `edits` would do and cost, touching no provider (estimate.py)."""
        return estimate(self, edits)

    @property
    def committed_before(self) -> float:
        """What earlier attempts of this run spent or committed (predictions still to
        collect): it counts against the budget."""
        return self.ledger.spent_usd + sum(h.amount_usd for h in self.purchases.held.values())

    # ------------------------------------------------------------------ processing

    def process(self, edit: Edit) -> Outcome:
        started = time.monotonic()
        outcome = self._blank_outcome(edit)
        made_for = None
        try:
            made_for = self._process(edit, outcome)
        except RowError as exc:
            outcome.status = outcome.status or FAILED
            outcome.error = sentence_of(exc)
        except SoundpatchError as exc:
            outcome.status = FAILED
            outcome.error = sentence_of(exc)
        except Exception as exc:  # a bug or an environment fault: keep the batch going
            outcome.status = FAILED
            full = _full_disk(exc, self.run_dir)
            if full is not None:
                outcome.error = f"{as_sentence(full).rstrip('.')}; free some space and run it again."
            else:
                outcome.error = (
                    f"Unexpected {type(exc).__name__}: {str(exc)[:200]} (details in {self.run_dir / 'errors.log'})."
                )
                self._log_traceback(edit)
        held = self.purchases.held.pop(edit.row_id, None)
        if held is not None:  # paid for before the crash and not collected: still owed
            self.ledger.settle(held, held.amount_usd, seen=False)
            outcome.cost_usd += held.amount_usd
        outcome.seconds = round(time.monotonic() - started, 3)
        unused = self.purchases.unused.pop(edit.row_id, None)
        kept = self._to_collect_again(edit.row_id, unused) if unused and outcome.status == FAILED else None
        failed = outcome.error.rstrip(".")
        if kept is not None:
            again = " (provider.resubmit_unusable: true pays for a new one instead)" if unused["again"] else ""
            outcome.error = (
                f"{failed}; the paid prediction is kept, and rerunning with --run-id "
                f"{self.run_id} tries it again at no new cost{again}."
            )
        outcome.attempts += self._sent_before(edit.row_id)
        to_collect = {"kept_paid": kept} if kept else {}  # the next attempt collects it (journal.py)
        self.journal.write("outcome", edit.row_id, outcome=outcome.to_dict(), made_for=made_for, **to_collect)
        if kept is not None and self.journal.broken is None:
            with self._lock:
                self._kept_paid.append(edit.row_id)
        elif kept is not None:  # the journal did not take it all (its disk filled up): say only what holds
            outcome.error = (
                f"{failed}; it was paid for, but the run's journal could not record all of it, so rerunning with "
                f"--run-id {self.run_id} collects it at no new cost only if its prediction id was recorded (if not, "
                "it is counted as spent and not sent again)."
            )
        if kept is None or kept["answer"] is None:
            self.answers.discard(edit.row_id)  # the outcome is on disk: the answer is not needed
        self._remove_leftover_staging(edit.row_id)
        return outcome

    def _to_collect_again(self, row_id: str, unused: dict[str, Any]) -> dict[str, Any] | None:
        """What the next attempt can collect of a paid prediction this row failed using: its
        kept answer, or its id to poll; None if neither is left (Stability's answer that
        was never kept: there is no id to ask for it again)."""
        prediction_id = unused["prediction_id"] or None
        answer = self.answers.record(row_id, unused["cost_usd"], prediction_id)
        if answer is None and prediction_id is None:
            return None
        return {"prediction_id": prediction_id, "answer": answer}

    def not_started(self, edit: Edit) -> Outcome:
        """A row the run stopped before (Ctrl-C): failed now, done by the next attempt."""
        outcome = self._blank_outcome(edit)
        outcome.status = FAILED
        outcome.error = self._not_started + "."
        outcome.attempts = self._sent_before(edit.row_id)
        self.journal.write("outcome", edit.row_id, outcome=outcome.to_dict())
        return outcome

    def _sent_before(self, row_id: str) -> int:
        """Creates the row sent in earlier attempts of this run: its outcome counts them all,
        as its cost counts all it paid."""
        state = self.states.get(row_id)
        return max(0, state.sent_before) if state is not None else 0

    def _remove_leftover_staging(self, row_id: str) -> None:
        state = self.states.get(row_id)
        for uri in state.staged if state is not None else []:
            if uri.startswith("s3://"):
                self.s3.delete(S3Uri.parse(uri))

    def _blank_outcome(self, edit: Edit) -> Outcome:
        state = self.states.get(edit.row_id)
        previous_cost = reported = 0.0
        if state is not None:
            previous_cost, reported = state.spent_before, state.reported_before
            if state.in_doubt:  # counted as spent (the ledger does so too)
                previous_cost += self._list_price(edit.row_id)
        return Outcome(
            row_id=edit.row_id,
            input=edit.input,
            start=edit.start,
            end=edit.end,
            prompt=edit.prompt,
            seed=edit.seed,
            provider=edit.provider or self.config.provider.name,
            status="",
            cost_usd=previous_cost,
            provider_cost_usd=reported,
            damaged=spans_text(edit.damaged),
            extra=dict(edit.extra),
        )

    def _process(self, edit: Edit, outcome: Outcome) -> dict[str, Any]:
        """Do the row; returns what its result was made for (kept with its outcome, so that
        a rerun can tell whether the row still asks for the same). Its recording is held
        decoded meanwhile, once there is room for it in memory (memory_room.py)."""
        source = None if edit.error else self.manifest.resolve_input(edit)

        def waiting(still: bool) -> None:  # for the progress line
            self.journal.write("waiting_for_memory" if still else "memory_granted", edit.row_id)

        try:
            with self.memory.holding(source, give_up=lambda: self.stopping, waiting=waiting):
                return self._process_held(edit, outcome)
        except NotAdmitted:
            raise RowError(self._not_started) from None

    def _process_held(self, edit: Edit, outcome: Outcome) -> dict[str, Any]:
        original: Audio | None = None
        try:
            checked = self.check(edit)
            # A remote recording an earlier run read is known by its version (source_records.py):
            # a row done already is then reused without downloading it. Any other is read now.
            self.source_records.vouch(checked.source)
            if self.sources.known_checksum(checked.source) is None:
                checked, original = self._decoded(checked, outcome)
            identity = self.identity(checked)
        except RowError:
            outcome.status = INVALID
            raise
        checksum = self.sources.checksum(checked.source)
        self.source_records.remember(checked.source)  # (a later estimate need not download it)
        request, sent = self.request(checked)
        made_for = {
            "request": request,
            "sent": sent,
            "identity": identity,
            "source_sha256": checksum,
            "source_stamp": self.sources.stamp(checked.source),
        }
        # An identical row being produced is waited for, then its result reused; so is a row
        # sending the same with other spans, then its answer kept with the results spliced again.
        producing = self.purchases.answer_looked_for(sent, checked.provider) or identity
        while True:
            if not self.force and self._reuse(edit, checked, identity, outcome, original):
                return made_for
            with self._lock:
                owner = self._in_flight.get(producing)
                if owner is None:
                    self._in_flight[producing] = threading.Event()
                    break
            owner.wait()
        try:
            if original is None:
                checked, original = self._decoded(checked, outcome)
            # Another process writing the same outputs may be producing it too, or sending the
            # same with other spans (its answer is then kept with the results): wait for it.
            with self.claims.claim(producing, give_up=stop_requested) as claim:
                if claim == STOPPED:
                    raise RowError(self._not_started)
                # ... and so may a run on another machine writing the same bucket.
                twins = producing if producing != identity and checked.edit.damaged else None
                with (
                    self._claim_in_bucket(checked.provider, twins, edit.row_id) as twin,
                    self._claim_in_bucket(checked.provider, identity, edit.row_id) as across,
                ):
                    if STOPPED in (twin, across):
                        raise RowError(self._not_started)
                    waited = WAITED in (claim, twin, across)  # for another's result: reused, if it made one
                    if waited and not self.force and self._reuse(edit, checked, identity, outcome, original):
                        if self.bucket_claims is not None:
                            self.bucket_claims.no_longer_doubted(identity)
                        return made_for
                    self._produce(checked, original, made_for, outcome)
        finally:
            with self._lock:
                self._in_flight.pop(producing).set()
        return made_for

    def _claim_in_bucket(self, provider: Provider, identity: str | None, row_id: str) -> AbstractContextManager[str]:
        """The edit claimed among the machines writing the output bucket (edit_claims.py),
        when a hosted model makes it (a create: money) and the run holds a lease there.

        Also, first, for a row with damaged spans, the answer it looks for (`identity`: an
        answer identity; None, for a row without spans): a run on another machine sending the
        same clip for other spans keeps that answer with the results, and the row waiting for
        it is spliced from it. That claim only makes rows wait: the edit's own says what was
        paid for, and what is in doubt."""
        if self.bucket_claims is None or not provider.hosted or identity is None:
            return nullcontext(CLAIMED)
        return self.bucket_claims.claim(
            identity,
            give_up=lambda: not self._may_start(),
            waiting=lambda run: self.journal.write("waiting", row_id, on=run),  # for the progress line
        )

    def identity(self, checked: Checked, estimating: bool = False) -> str:
        provider = checked.provider
        checksum = self._checksum(checked, estimating)
        return edit_identity(checked.edit, checksum, provider.name, provider.model, self.config)

    def request(self, checked: Checked, estimating: bool = False) -> tuple[str, str]:
        """The row's request identity, and that of what it sends (identity.sent_identity)."""
        checksum = self._checksum(checked, estimating)
        return request_identity(checked.edit, checksum), sent_identity(checked.edit, checksum)

    def _checksum(self, checked: Checked, estimating: bool) -> str:
        """The SHA-256 of the row's recording. `estimating`: a remote recording is not
        downloaded for it where no run writing here has read that version of it (nothing
        here can be of it: source_records.py), unless this run has an attempt of the row."""
        source = checked.source
        if estimating and remote(source) and checked.edit.row_id not in self.states:
            self.source_records.vouch(source)
            known = self.sources.known_checksum(source)
            return known if known is not None else f"not read: {source}"
        return self.sources.checksum(source)

    def _decoded(self, checked: Checked, outcome: Outcome) -> tuple[Checked, Audio]:
        """The row's recording, decoded; with its region checked again where its header
        said it holds more than it does (audio.cut_short)."""
        try:
            original = self.sources.audio(checked.source)
            if original.info != checked.info:
                checked = replace(checked, info=original.info)
                _region_in(checked.edit, checked.info)
        except RowError:
            outcome.status = INVALID
            raise
        return checked, original

    def _reuse(self, edit: Edit, checked: Checked, identity: str, outcome: Outcome, original: Audio | None) -> bool:
        """Publish an earlier result with this identity under this row's name: skipped_done,
        cost 0. The recording, if not decoded yet, is decoded only where that takes it
        (results.Results.reuse)."""

        def decoded() -> Audio:
            return original if original is not None else self._decoded(checked, outcome)[1]

        if not self.results.reuse(edit, checked.info, identity, outcome, decoded):
            return False
        self.journal.write("reused", edit.row_id, identity=identity, reused_from=outcome.reused_from)
        return True

    def _produce(self, checked: Checked, original: Audio, made_for: dict, outcome: Outcome) -> None:
        """The row's prediction, spliced into its recording and published."""
        edit = checked.edit
        a, b = audio_ops.region_frames(edit.start or 0.0, edit.end or 0.0, original.rate, original.frames)
        work = RowWork(checked, original, a, b, made_for, outcome)
        with self._room_for(edit, checked) as room:
            made = self.purchases.prediction(work, room)
            if made is None:
                return  # the budget is reached: not sent
            prediction, provider = made
            encoded, quality = self.splicer.splice(work, prediction, provider)
            room.written()
            try:
                self.splicer.publish(work, prediction, provider, encoded, quality)
            except KeptUnpublished:
                self.purchases.unused.pop(edit.row_id, None)  # the result itself is kept: the next run publishes it
                raise
            finally:
                encoded.discard()
            self.purchases.keep_with_results(work, prediction, provider)
        self.purchases.unused.pop(edit.row_id, None)
        outcome.status = SUCCEEDED

    def _room_for(self, edit: Edit, checked: Checked) -> Promise:
        return self.room.for_result(*self.room_needed(edit, checked))

    def room_needed(self, edit: Edit, checked: Checked) -> tuple[int, int]:
        """The most the row's result takes on disk, and the answer it is made from when a
        hosted model's answer is kept on disk (answers.py)."""
        region = (edit.end or 0.0) - (edit.start or 0.0)
        context = self.purchases.clip_settings["context_seconds"]
        answer = answer_bytes_bound(region, context) if checked.provider.hosted else 0
        return self.publisher.bytes_bound(checked.info, edit), answer

    def _may_start(self) -> bool:
        """Whether a new prediction may go out: the run is not stopping, its journal can be
        written, and it is still this machine's (lease.py)."""
        return not self.stopping and (self.lease is None or self.lease.holds())

    @property
    def stopping(self) -> bool:
        """No more rows are started: asked to stop, or the journal cannot be written. (A
        lease that could not be renewed for a while may be renewed again: rows still start,
        and each sends nothing while it is not.)"""
        return stop_requested() or self.journal.broken is not None

    @property
    def _not_started(self) -> str:
        if self.lease is not None and not self.lease.holds():
            return f"{NOT_STARTED}{self.lease.why_not()}, so nothing more is sent from this machine"
        if self.journal.broken is not None:
            return (
                f"{NOT_STARTED}{self.journal.broken}, so no more rows start; run it again with --run-id "
                f"{self.run_id} once it can be written"
            )
        return f"{NOT_STARTED}the run was interrupted; run it again with --run-id {self.run_id}"

    def _should_cancel(self) -> bool:
        return self.config.provider.on_interrupt == "cancel" and stop_requested()

    def _log_traceback(self, edit: Edit) -> None:
        """The traceback for errors.log, if the run's disk takes it (the row says what failed anyway)."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)  # the fault may have come before anything was written
            with self._lock, open(self.run_dir / "errors.log", "a", encoding="utf-8") as f:
                f.write(f"--- row {edit.row_id} ({edit.line}) at {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
                f.write(traceback.format_exc())
        except OSError:
            pass

    # ------------------------------------------------------------------ closing

    def combine(self, outcomes: list[Outcome]) -> None:
        """Build the files that rows of one recording share, once the rows are done; sets
        each row's `combined` (combine.py)."""
        combiner = Combiner(self.publisher, self.store, self.sources, self.journal, self.run_dir)
        self._combined.extend(combiner.build(outcomes, self._edits, self.manifest.resolve_input, self._log_traceback))

    def add_to_index(self, outcomes: list[Outcome]) -> None:
        """The run's results into the dataset's index, where output.index names one."""
        name = self.config.output.index
        if name is not None and not self.dry_run:
            note = dataset_index.update(self.store, name, outcomes, self.run_id)
            if note is not None:
                self._index_note.append(note)
            else:
                self.index_uri = self.store.uri(name)

    def input_notes(self) -> list[str]:
        """What to say of the inputs read so far: what they hold other than their headers say,
        and what the output format cannot hold of them."""
        return self.sources.header_notes() + self.publisher.rounding_notes(self.sources.infos())

    def notes(self) -> list[str]:
        notes = lookalike_notes(self.manifest.edits) + self.input_notes()
        for p in self.providers.values():
            if not p.uses_prompt:
                notes.append(
                    f"The {p.name} engine rebuilds each region from the rest of its recording; "
                    "the prompt is recorded but does not steer it."
                )
        alike = self.splicer.alike_note()
        if alike:
            notes.append(alike)
        if self.changed_rows:
            one = len(self.changed_rows) == 1
            notes.append(
                f"{_rows(self.changed_rows)} changed in the manifest since an earlier attempt of this run finished "
                f"{'it' if one else 'them'}, and {'was' if one else 'were'} done again."
            )
        if self._set_aside:
            notes.append(
                f"{_rows(self._set_aside)} changed in the manifest after an earlier attempt of this run paid for "
                f"{'its' if len(self._set_aside) == 1 else 'their'} prediction: what was paid stays in cost_usd, "
                f"and {'it was' if len(self._set_aside) == 1 else 'they were'} made anew."
            )
        if self.journal.broken is not None:
            notes.append(
                f"{as_sentence(self.journal.broken).rstrip('.')}; no rows started after that: run the same command "
                f"with --run-id {self.run_id} once it can be written."
            )
        if self._kept_paid:
            one = len(self._kept_paid) == 1
            notes.append(
                f"{_rows(self._kept_paid)} failed using a prediction already paid for; "
                f"{'it is' if one else 'they are'} kept, and rerunning with --run-id {self.run_id} tries "
                f"{'it' if one else 'them'} again at no new cost."
            )
        if self._spent_before > self.ledger.budget_usd + 1e-9:  # the summary's "spent $x of $y" reads as crossed
            notes.append(
                f"Earlier attempts of run {self.run_id} spent or committed ${self._spent_before:.2f}, more than this "
                f"attempt's budget of ${self.ledger.budget_usd:.2f}, which counts the whole run: this attempt sent "
                f"nothing new (a budget above ${self._spent_before:.2f} lets it go on)."
            )
        if self.left_out:
            notes.append(
                f"--rows ran {plural(len(self._edits), 'row')} of run {self.run_id}; the report also holds the "
                f"{plural(len(self.left_out), 'other row')} an earlier attempt ended, as it left them."
            )
        notes.extend(self.markup.notes())
        notes.extend(combined_note(self._combined))
        notes.extend(self._index_note)
        cleared, freed = self._cleared
        if cleared:
            notes.append(
                f"{human_size(freed)} of half-written results left in the scratch folders of runs that had stopped "
                f"({', '.join(cleared[:3])}{', ...' if len(cleared) > 3 else ''}) were removed: rerunning those "
                "with their --run-id makes them again from what was paid for."
            )
        if self._copy_read:
            notes.append(self._copy_read)
        if self._no_lease:
            notes.append(self._no_lease)
        claimed = self._leftovers.note() if self._leftovers is not None else ""
        if claimed:
            notes.append(claimed)
        spliced_again = self.kept_answers.note() if self.kept_answers is not None else ""
        if spliced_again:
            notes.append(spliced_again)
        doubted = self.doubts_here.doubt_note()
        if doubted:
            notes.append(doubted)
        behind = self.journal.copy.note() if self.journal.copy is not None else None
        if behind:
            notes.append(behind)
        return notes

    def close(self) -> None:
        self.journal.close()
        # The whole journal in place of the rows' copies, unless the run is another machine's
        # now: its rows' copies are its own.
        # Nor when lines are missing from it (its disk filled up): the rows' copies have them.
        whole = self.journal.path.exists() and self.journal.broken is None
        if self.journal.copy is not None and whole and (self.lease is None or self.lease.holds()):
            self.journal.copy.replace_with(self.journal.path)
        if self.lease is not None:
            self.lease.give_back()
        self._blas.restore_original_limits()
        if not self.dry_run:  # a dry run beside the run itself leaves its files alone
            shutil.rmtree(self.scratch, ignore_errors=True)
        self.run_lock.release()


def _spans_rebuilt_alone(edit: Edit) -> None:
    """Raise RowError where a span of `edit` is too long for the local engine to rebuild alone."""
    for a, b in edit.damaged:
        if b - a > MAX_DAMAGED_SECONDS + 1e-9:
            raise RowError(
                f"Damaged span {a:g}-{b:g} is {1000 * (b - a):.1f} ms long, over the {1000 * MAX_DAMAGED_SECONDS:.0f} "
                "ms the local engine rebuilds alone; give a longer gap a row of its own, or send the row to a "
                "hosted model (its provider column)"
            )


def _rows(row_ids: list[str]) -> str:
    shown = ", ".join(sorted(row_ids)[:5]) + (", ..." if len(row_ids) > 5 else "")
    return f"{plural(len(row_ids), 'row')} ({shown})"


def _full_disk(exc: Exception, run_dir: Path) -> str | None:
    """Why a step failed when it was for want of disk space, naming the disk (the file's, when
    the error names one); else None."""
    if not isinstance(exc, OSError) or exc.errno not in FULL_ERRNOS:
        return None
    named = exc.filename if isinstance(exc.filename, str | os.PathLike) else None
    return full_disk(Path(named).parent if named else run_dir, exc)
