"""One producer per edit among machines writing one output bucket: a claim object there.

The claims of locks.py keep two processes of one machine from paying for the same edit at
once, and the output index (storage.py) keeps any later run from paying for one already
made. Left open: two runs with different ids, on different machines, writing one bucket,
whose manifests overlap (two workers given overlapping slices of a library, a laptop and a
server on the same sources). Both would send the same edit before either had published it,
and pay for it twice. So before a paid row is sent, its edit is claimed in the bucket:

    <output.uri>/.soundpatch/claims/<identity>     written with If-None-Match: *

A row that finds the edit claimed by a run that is still going waits until the claim is
let go, then reuses the result that run published (at $0), or makes it if that run could
not. "Still going" is the claimant's run lease (lease.py): a claim whose run holds no
lease, or one not renewed for `storage.s3.lease_seconds` by the bucket's clock (its machine
is gone), is taken over (If-Match on its ETag: of two machines, one wins). A claim of this
very run (an earlier process, which crashed) is this run's to take back: the lease says no
other machine goes on with it.

Once the claimant's create is made, the claim names its prediction (`made`), so that a run
taking the claim over after that machine died collects the prediction it paid for instead
of paying for the edit a second time (`left_by`).

A create whose answer never came (it timed out; or the machine died with it out) may exist
and be billed, with no id to collect it by: no run sends that edit again unless
provider.resubmit_in_doubt says to, whatever machine it runs on. A row whose create ends
in doubt leaves its claim in place as it ends, naming its run (`doubt`), instead of letting
it go; a run that takes over the claim of a dead run that named no prediction reads that
run's journal's copy in the bucket (journal_copy.py) to learn whether its create went out.
Either way the row there fails at no cost (`doubted_by`), and the claim stays, naming
that doubt, until a run told to resubmit sends the edit (or finds its result made) and
lets the claim go. A claim naming a doubt is no one's to wait for: it is taken over at
once.

A row with damaged spans claims the model's answer it looks for (identity.answer_identity)
the same way, before its edit (batch.py): a run elsewhere sending the same clip for other
spans keeps that answer with the results (kept_answers.py), and the row that waited for it
is spliced from it. Such a claim only makes rows wait: it never names a prediction or a
doubt (those are the edit's).

Only with a run lease: a store without conditional writes can keep no claim either. Rows of
the local engine, which sends nothing, claim nothing.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from soundpatch.errors import RowError
from soundpatch.journal import lose_answers, parse, states_from
from soundpatch.journal_copy import JournalCopy
from soundpatch.lease import lease_uri
from soundpatch.leftovers import Left, Leftovers
from soundpatch.locks import CLAIMED, STOPPED, WAITED
from soundpatch.s3 import S3, S3Uri

CLAIMS_PREFIX = ".soundpatch/claims"  # beside the output index and the runs' journals
POLL_SECONDS = 1.0
_UNCLAIMED = "The edit could not be claimed in the output bucket before the create, so nothing was sent ({})"


class BucketClaims(Leftovers):
    def __init__(
        self,
        s3: S3,
        output: S3Uri,
        run_id: str,
        lease_seconds: float,
        still_leased: Callable[[], bool],
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        """`still_leased()`: whether this run's lease is known held (then no one can have
        taken its claims over, and letting one go needs no look first)."""
        self.s3, self.output, self.run_id = s3, output, run_id
        self.lease_seconds, self.still_leased, self.poll_seconds = lease_seconds, still_leased, poll_seconds
        self._holder = f"process {os.getpid()} on {socket.gethostname()}"
        self._token = secrets.token_hex(8)
        self._writes = 0
        super().__init__()  # (its lock guards the claims' state too)
        self.waited_on: dict[str, str] = {}  # run id -> its holder, for runs whose claims rows waited on
        self.taken_over: dict[str, str] = {}  # the same, for runs whose lapsed claims were taken over
        self._etags: dict[str, str] = {}  # identity -> the ETag of this run's claim on it, while held
        # (Leftovers' `_left`: identity -> the prediction a claim taken over named.)
        self._doubted: dict[str, str] = {}  # identity -> the run a claim taken over left a create in doubt for
        self._keep_doubt: dict[str, str] = {}  # identity -> the run whose doubt this run's claim keeps as it ends
        self._doubts_of: dict[str, set[str]] = {}  # run -> the edits its journal's copy leaves in doubt
        self._claimed: set[str] | None = None  # the claims' keys, as listed once (`seen`)

    @contextmanager
    def claim(
        self, identity: str, give_up: Callable[[], bool], waiting: Callable[[str], None] = lambda run: None
    ) -> Iterator[str]:
        """Held while this run alone, among the machines writing the bucket, produces
        `identity`. Yields CLAIMED; WAITED when it was claimed by another run first (its
        result may be in the store now); STOPPED if `give_up()` turned true while waiting
        (nothing is held then). `waiting(run)` is told once when it begins to wait for `run`."""
        uri = self.output.child(f"{CLAIMS_PREFIX}/{identity}")
        how, told = CLAIMED, False
        etag = self._write(uri, if_match=None)
        while etag is None:
            there = self._look(uri)
            run = there[2].get("run", "") if there is not None else ""
            holder = there[2].get("holder", "") if there is not None else ""
            doubt = there[2].get("doubt", "") if there is not None else ""
            if there is not None and run != self.run_id and not doubt and self._going(run):
                if not told:
                    waiting(run)
                how, told = WAITED, True
                with self._lock:
                    self.waited_on.setdefault(run, holder)
                if give_up():
                    yield STOPPED
                    return
                time.sleep(self.poll_seconds)
                continue
            # Let go meanwhile, this run's own (from an earlier process), a doubt's, or its run is gone.
            other = there is not None and run != self.run_id and not doubt
            if other and not there[2].get("prediction") and self._left_in_doubt(run, identity):
                doubt = run  # its create went out and no answer came: it may exist
            etag = self._write(uri, if_match=there[0] if there is not None else None)
            how = WAITED  # (its result may be there now)
            if etag is not None and other:
                with self._lock:
                    self.taken_over.setdefault(run, holder)
                    if there[2].get("prediction"):  # it had paid for the edit: that is to collect
                        self._left[identity] = Left(run, there[2]["prediction"], there[2].get("provider", ""))
            if etag is not None and doubt and doubt != self.run_id:
                with self._lock:
                    self._doubted[identity] = doubt
        with self._lock:
            self._etags[identity] = etag
        try:
            yield how
        finally:
            with self._lock:
                etag = self._etags.pop(identity, etag)
                self._left.pop(identity, None)
                # A doubt found on it is kept unless the row sent the edit again, or found it made.
                kept = self._keep_doubt.pop(identity, "") or self._doubted.pop(identity, "")
                self._doubted.pop(identity, None)
            if kept:
                self._keep(uri, etag, kept)
            else:
                self._let_go(uri, etag)

    def seen(self, identity: str) -> tuple[str, Left | None]:
        """What the edit's claim would tell a row of this run now, read only (a dry run): the
        run whose create in doubt it names, or a gone claimant left ("" if none), and the
        prediction a gone claimant paid for, to collect. One listing of the claims first, so
        only an edit claimed costs a request more."""
        with self._lock:
            if self._claimed is None:
                self._claimed = set()  # (listed once, read or not)
                self._claimed = set(self.s3.keys(self.output.child(f"{CLAIMS_PREFIX}/")))
            claimed = self._claimed
        uri = self.output.child(f"{CLAIMS_PREFIX}/{identity}")
        there = self._look(uri) if uri.key in claimed else None
        if there is None:
            return "", None
        run, doubt = there[2].get("run", ""), there[2].get("doubt", "")
        if doubt or run == self.run_id or self._going(run):
            return doubt, None  # (a run going now: its result is reused once made)
        if there[2].get("prediction"):
            return "", Left(run, there[2]["prediction"], there[2].get("provider", ""))
        return (run if self._left_in_doubt(run, identity) else ""), None

    def doubted_by(self, identity: str) -> str:
        """The run that sent a create for the edit held here and never heard back, as the
        claim this run took over said ("" if none)."""
        with self._lock:
            return self._doubted.get(identity, "")

    def no_longer_doubted(self, identity: str) -> None:
        """The edit held here is sent again as told to (provider.resubmit_in_doubt), or its
        result turned out made: the doubt its claim named goes with the claim."""
        with self._lock:
            self._doubted.pop(identity, None)

    def keep_doubt(self, identity: str, run: str) -> None:
        """The claim held on `identity` stays in the bucket as it ends, naming `run`'s create
        in doubt, for every run after to see (until one told to resubmit makes the edit)."""
        with self._lock:
            if identity in self._etags:
                self._keep_doubt[identity] = run

    def _left_in_doubt(self, run: str, identity: str) -> bool:
        """Whether `run` (its machine gone) left a create for `identity` in doubt, as its
        journal's copy in the bucket tells: sent, and no prediction id came back (an answer
        it kept on that machine's disk is gone with it). Read once a run."""
        with self._lock:
            known = self._doubts_of.get(run)
        if known is None:
            try:
                lines = JournalCopy(self.s3, self.output, run).lines()
            except RowError as exc:
                raise RowError(
                    f"The edit's claim in the output bucket is run {run}'s, whose machine is gone, and its journal's "
                    f"copy could not be read to tell whether its create went out, so nothing was sent ({exc})"
                ) from None
            gone = lose_answers(states_from(parse(lines)), lambda answer: False)  # with the machine
            known = {
                s.identity for s in gone.values() if s.identity and (s.in_doubt or s.doubted) and not s.prediction_id
            }
            with self._lock:
                self._doubts_of[run] = known
        return identity in known

    def _keep(self, uri: S3Uri, etag: str, doubt: str) -> None:
        """The claim rewritten to name `doubt`, and left in place (unless taken over meanwhile)."""
        try:
            self._write(uri, if_match=etag, extra={"doubt": doubt})
        except RowError:
            pass  # (this run's claim, left as it was: taken over once its lease lapses, as a dead run's)

    def made(self, identity: str, prediction_id: str, provider: str) -> None:
        """The claim held on `identity` names the prediction its create made (best effort:
        without it, a run taking the claim over would only pay for the edit again)."""
        with self._lock:
            etag = self._etags.get(identity)
        if etag is None:
            return
        uri = self.output.child(f"{CLAIMS_PREFIX}/{identity}")
        try:
            etag = self._write(uri, if_match=etag, extra={"prediction": prediction_id, "provider": provider})
        except RowError:
            return
        if etag is not None:  # (None: taken over meanwhile, this run's lease having lapsed)
            with self._lock:
                if identity in self._etags:
                    self._etags[identity] = etag

    def _write(self, uri: S3Uri, if_match: str | None, extra: dict[str, str] | None = None) -> str | None:
        with self._lock:
            self._writes += 1
            body = f"{self.run_id}\n{self._holder}\n{self._token} {self._writes}\n".encode()  # an ETag of its own
        metadata = {"run": self.run_id, "holder": self._holder, **(extra or {})}
        try:
            return self.s3.put_if(uri, body, metadata, if_match=if_match)
        except RowError as exc:
            raise RowError(_UNCLAIMED.format(exc)) from None

    def _look(self, uri: S3Uri) -> tuple[str, float, dict[str, str]] | None:
        try:
            return self.s3.age(uri)
        except RowError as exc:
            raise RowError(_UNCLAIMED.format(exc)) from None

    def _going(self, run: str) -> bool:
        """Whether run `run` holds its lease: written less than `lease_seconds` ago."""
        if not run:
            return False
        lease = self._look(lease_uri(self.output, run))
        return lease is not None and lease[1] < self.lease_seconds

    def _let_go(self, uri: S3Uri, etag: str) -> None:
        """Delete the claim, unless another machine took it over (this run's lease lapsed)."""
        try:
            if not self.still_leased():
                there = self.s3.age(uri)
                if there is None or there[0] != etag:
                    return
            self.s3.delete(uri)
        except RowError:
            pass  # left behind: taken over once this run's lease lapses

    def note(self) -> str:
        """What the claims made rows do, for the run's notes ("" when nothing)."""
        parts = []
        waited = {run: holder for run, holder in self.waited_on.items() if run not in self.taken_over}
        if waited:
            parts.append(
                f"Rows waited for {_runs(waited)}, which {'was' if len(waited) == 1 else 'were'} making the same "
                "edits at the same time, instead of paying for them twice."
            )
        if self.taken_over:
            parts.append(
                f"Edits that {_runs(self.taken_over)} had claimed in the bucket were taken over here after "
                + (
                    "its lease there lapsed (its machine is gone)."
                    if len(self.taken_over) == 1
                    else "their leases there lapsed (their machines are gone)."
                )
            )
        if self.collected:
            count = sum(self.collected.values())
            parts.append(
                f"{count} of them {'was' if count == 1 else 'were'} collected from the prediction"
                f"{'' if count == 1 else 's'} {_runs({run: '' for run in self.collected})} had paid for, "
                "at no new cost here."
            )
        if self.uncollectable:
            count = sum(self.uncollectable.values())
            parts.append(
                f"For {count} of them the prediction {_runs({run: '' for run in self.uncollectable})} had paid for "
                "had failed, or was not there to be seen with this key, so "
                f"{'it was' if count == 1 else 'they were'} made here."
            )
        return " ".join(parts)


def _runs(runs: dict[str, str]) -> str:
    named = [f"run {run}" + (f" ({holder})" if holder else "") for run, holder in sorted(runs.items())[:3]]
    more = len(runs) - len(named)
    return ", ".join(named) + (f" and {more} more" if more > 0 else "")
