"""What a run would do and cost, before it does anything (`soundpatch validate`, `run
--dry-run`): rows, predictions, the expected cost against the budget, the expected wall
time at the configured limits, and what would stop rows or the run. It touches no
provider and spends nothing; it asks the batch the same questions a run's rows do."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from soundpatch.cpu import AT_ONCE
from soundpatch.disk_room import DiskRoom
from soundpatch.edits import Edit
from soundpatch.errors import ConfigError, RowError, sentence_of
from soundpatch.humanize import size as human_size
from soundpatch.manifest import lookalike_notes
from soundpatch.sources import HEADERS_AT_ONCE

if TYPE_CHECKING:
    from soundpatch.batch import Batch
    from soundpatch.edit_claims import BucketClaims
    from soundpatch.leftovers import Left
    from soundpatch.row import Checked

# Typical seconds per prediction, for the wall-time estimate before a run. The local
# engine's is a row's time on one core (on this project's 2-core machine, 2,000 rows of
# 50 ms dropouts took 0.53 s a row a core; of 0.5 s gaps, 0.18 s). Since its probes run on
# the channels' mix, 300 rows of 50 ms dropouts in four recordings take 0.38 s (0.47 s
# before, same hour): kept at 0.5, the estimate errs on the long side.
TYPICAL_SECONDS = {"local": 0.5, "eachlabs": 15.0, "stability": 15.0, "fal": 15.0}
# ... but a row whose damaged spans alone it rebuilds (clicks, short dropouts) is some ms a
# span, all told. The engine's own work is about 3 ms a span (one thread, music); in a run
# (flow wall time on two cores, 2026-12-04), a minute of crackle at 20 ticks a second took
# 20.4 s as 767 rows of a tick each and 2.6 s as 12 rows of 991 spans (as detect joins them
# for the local engine); at 80 a second, 32.2 s as 1,116 rows and 5.4 s as 12 rows of 2,025
# spans. This fits all four within 10% (it was 0.035 and 0.009: joined rows came out 1.8
# times as long as they took); a 30-minute tape of 60,813 spans in 360 rows took 120 s,
# estimated 164 s (284 s before).
SPANS_ROW_SECONDS, SPAN_SECONDS = 0.045, 0.005
# A row's result is a whole copy of its recording (but for a row of a combined file: an
# excerpt), written, read back in part and published: the local engine's rows on a
# 30-minute stereo tape (318 MB a result) took 3.7 s a row a core where the row's own work
# is the 0.5 s above, so about 100 MB a second a core.
WRITTEN_BYTES_PER_SECOND = 100e6
# The local engine searches its recording for a passage to fill the region with (90 s each
# side of it; its probes, 30 s each side of themselves): a recording over a minute gives it
# more to search, up to twice the work at three minutes and more (bench/local_engine.py: a
# 4-minute recording's 30-100 ms gaps 0.64-0.87 s an edit, a 30-second clip's 0.32-0.48 s;
# a 30-minute tape's 40 dropouts took 30 s on two cores, 1.5 s a row a core).
SEARCHED_FROM_SECONDS, SEARCHED_UP_TO_SECONDS = 60.0, 180.0
# Rows' results looked for in the output store at once (as many as the remote recordings'
# headers read at once: the S3 client's connections are sized for them).
LOOKUPS_AT_ONCE = HEADERS_AT_ONCE


def _claim_says(claims: BucketClaims, identity: str) -> tuple[str, Left | None]:
    """What the edit's claim in the bucket would tell the run; nothing where it cannot be
    read (the row then counts as a prediction: the estimate errs on the side of cost)."""
    try:
        return claims.seen(identity)
    except RowError:
        return "", None


@dataclass(frozen=True)
class _Row:
    """A valid row as the estimate counts it: its identity (identity.py), its request's and
    what it sends, and the answer kept with the results it would look for (None: none)."""

    edit: Edit
    checked: Checked
    identity: str
    request: str
    sent: str
    answer: str | None


def _prepared(batch: Batch, edit: Edit) -> _Row | tuple[Edit, str]:
    """The row checked, with its identities; or why it is invalid."""
    try:
        checked = batch.check(edit)
        identity = batch.identity(checked, estimating=True)
    except RowError as exc:
        return edit, sentence_of(exc)
    request, sent = batch.request(checked, estimating=True)
    return _Row(edit, checked, identity, request, sent, batch.purchases.answer_looked_for(sent, checked.provider))


def _looked_up(batch: Batch, rows: list[_Row]) -> tuple[set[str], set[str]]:
    """Of `rows`, the identities whose result the output store holds (none under --force),
    asked LOOKUPS_AT_ONCE at a time, as each is a request to a bucket (one after another, a
    dataset of thousands of rows waited minutes); and the answers kept with the results (one
    listing of them)."""
    identities = [] if batch.force else list({row.identity for row in rows})
    answers = list({row.answer for row in rows if row.answer is not None})
    kept_answers = batch.kept_answers

    def made(identity: str) -> bool:
        return batch.results.earlier(identity) is not None

    def kept(answer: str) -> bool:
        return kept_answers is not None and kept_answers.holds(answer)

    with ThreadPoolExecutor(max_workers=LOOKUPS_AT_ONCE) as pool:
        made_ones = [i for i, yes in zip(identities, pool.map(made, identities), strict=True) if yes]
    return set(made_ones), {answer for answer in answers if kept(answer)}


def estimate(batch: Batch, edits: list[Edit]) -> dict[str, Any]:
    """What a run would do and cost, touching no provider: identical rows count once, and
    rows whose result the output store already holds count as done (unless --force).
    Resuming a run, what its earlier attempts paid for is collected, not bought again,
    and a create in doubt is not sent again: neither costs anything more."""
    predictions, cost, invalid, errors, done, duplicates = 0, 0.0, 0, [], 0, 0
    # Rows sending what an earlier row sends, with other damaged spans: spliced from its answer
    # once it is kept (kept_answers.py), where that row is to get one (bought, or collected).
    twins, answered = 0, set()
    largest = (0, 0, "")  # the result that takes the most room on disk: (result, answer, row)
    largest_file = (0, "")  # and the largest file holding several rows' edits: (bytes, name)
    to_collect = in_doubt = changed = 0
    resubmit = batch.config.provider.resubmit_in_doubt
    per_provider: dict[str, int] = {}
    work: dict[str, float] = {}  # the local engine's seconds of work on one core, by provider
    written: dict[str, int] = {}  # bytes of results, by provider
    combined: set[str] = set()  # files of several rows' results, counted once each
    seen: set[str] = set()
    # Spent or committed by earlier attempts of this run: it counts against the budget.
    spent_before = batch.committed_before
    within_budget = 0  # predictions that fit in the budget, taken in the manifest's order
    first_output = ""  # where the first valid row's result goes, to check a template by
    rows = [_prepared(batch, edit) for edit in edits]
    made, kept = _looked_up(batch, [row for row in rows if isinstance(row, _Row)])
    for row in rows:
        if not isinstance(row, _Row):
            edit, reason = row
            invalid += 1
            errors.append((edit.row_id, edit.line, reason))
            continue
        edit, checked, identity, answer = row.edit, row.checked, row.identity, row.answer
        if not first_output:  # (a row whose edit goes into a file with others': that file)
            name = batch.publisher.combined.get(edit.row_id) or batch.publisher.name(edit, checked.info)
            first_output = batch.store.uri(name)
        if identity in seen:
            duplicates += 1
            continue
        seen.add(identity)
        if identity in made:
            done += 1
            continue
        if answer is not None and answer in answered:
            twins += 1
            continue
        state = batch.attempt_for(edit.row_id, row.request, row.sent)
        if state is not None and state.settled and batch.config.provider.resubmit_unusable:
            state = None  # what it could not use is given up: a new prediction
        elif state is None and edit.row_id in batch.states:
            changed += 1  # a new prediction (what was paid for the old request stays counted)
        elif edit.row_id in batch.changed_rows:
            changed += 1
        if state is not None and (state.in_doubt or state.doubted) and not resubmit:
            in_doubt += 1
            continue
        if state is not None and (state.prediction_id or state.answer):
            to_collect += 1
            answered.add(answer)
            continue
        if state is None and batch.left_here is not None and batch.left_here.has(identity):
            to_collect += 1  # a stopped run's (left_here.py)
            answered.add(answer)
            continue
        if answer in kept:  # (looked for after what earlier attempts left, as a run does)
            to_collect += 1  # the model's answer, kept with the results (kept_answers.py)
            answered.add(answer)
            continue
        if state is None and batch.doubts_here.doubted_by(identity) and not resubmit:
            in_doubt += 1  # a stopped run's, not sent again (left_here.py)
            continue
        if state is None and batch.claims_seen is not None:  # runs' of other machines (edit_claims.py)
            doubt, left = _claim_says(batch.claims_seen, identity)
            if doubt and not resubmit:
                in_doubt += 1
                continue
            if left is not None:
                to_collect += 1
                answered.add(answer)
                continue
        predictions += 1
        answered.add(answer)
        # At the most a prediction cost in earlier attempts, where that is more than the price.
        cost += batch.markup.expected(checked.provider.name, checked.provider.price_usd)
        within_budget += spent_before + cost <= batch.config.limits.budget_usd + 1e-9
        needed = batch.room_needed(edit, checked)
        largest = (*needed, edit.row_id) if sum(needed) > sum(largest[:2]) else largest
        name = checked.provider.name
        per_provider[name] = per_provider.get(name, 0) + 1
        if not checked.provider.hosted:
            row = (
                SPANS_ROW_SECONDS + SPAN_SECONDS * len(edit.damaged)
                if edit.damaged
                else _local_row_seconds(checked.info.duration)
            )
            work[name] = work.get(name, 0.0) + row
        written[name] = written.get(name, 0) + needed[0]
        shared = batch.publisher.combined.get(edit.row_id)
        if shared is not None and shared not in combined:  # the whole recording (its rows' results: their parts)
            combined.add(shared)
            whole = batch.publisher.bytes_bound(checked.info, edit, whole=True)
            written[name] += whole
            largest_file = (whole, shared) if whole > largest_file[0] else largest_file
    limits = batch.config.limits
    # Rows of several providers (a manifest's provider column) are in flight together: the
    # local engine's work is done while the hosted rows wait for their answers.
    seconds = 0.0
    for name, count in per_provider.items():
        if batch.provider_named(name).hosted:
            latency = TYPICAL_SECONDS.get(name, 15.0)
            took = _hosted_seconds(count, latency, limits.concurrency, limits.requests_per_minute)
        else:  # the local engine sends no request: as many rows at once as it has cores (cpu.py)
            busy = work[name] + written[name] / WRITTEN_BYTES_PER_SECOND
            took = busy / min(limits.concurrency, AT_ONCE)
        seconds = max(seconds, took)
    results_bytes = sum(written.values())
    free = batch.room.outputs_free()  # (the output folder, when a local one, and its disk's free space)
    shared_files = batch.publisher.combined  # row -> the file its edit goes into with others'
    return {
        "rows": len({e.line for e in edits}),
        "results": len(edits),
        "predictions": predictions,
        "predictions_by_provider": per_provider,  # (a manifest may name a row's provider)
        "invalid": invalid,
        "already_done": done,
        "duplicates": duplicates,
        "twins": twins,  # sending what another row sends, with other damaged spans
        "to_collect": to_collect,
        "changed": changed,  # since an earlier attempt of this run made or paid for it
        "in_doubt": in_doubt,
        # Files holding several rows' edits of one recording (soundpatch/combine.py).
        "combined_files": len(set(batch.publisher.combined.values())),
        "spent_before_usd": round(spent_before, 6),
        "expected_cost_usd": round(cost, 6),
        "within_budget": within_budget,
        "budget_usd": limits.budget_usd,
        "expected_seconds": round(seconds, 1),
        "results_bytes": results_bytes,  # what the results to be made take, at the most
        "outputs_free": (str(free[0]), free[1]) if free is not None else None,
        "first_output": first_output,
        # Files the results make: one each, but one for the rows whose edits go into one file.
        "result_files": len(edits) - invalid - len(shared_files) + len(set(shared_files.values())),
        "errors": errors,
        "notes": lookalike_notes(edits)
        + batch.input_notes()
        + batch.markup.notes_before()
        + _unready(batch, per_provider)
        + _short_of_disk(batch.room, *largest)
        + _file_short_of_disk(batch.room, *largest_file)
        + _outputs_fill_up(free, batch.room.margin_bytes, results_bytes, largest[0]),
    }


def _hosted_seconds(predictions: int, latency: float, concurrency: int, per_minute: int) -> float:
    """A hosted provider's predictions, `concurrency` of them in flight and creates paced at
    the rate: the slower of waves of predictions a latency each, and the last create's turn
    and its latency (two predictions take one latency, not two fortieths of it)."""
    waves = math.ceil(predictions / concurrency) * latency
    return max(waves, (predictions - 1) / (per_minute / 60.0) + latency)


def _local_row_seconds(duration: float) -> float:
    """A local engine row's work on one core, by how long its recording is."""
    longer = (duration - SEARCHED_FROM_SECONDS) / (SEARCHED_UP_TO_SECONDS - SEARCHED_FROM_SECONDS)
    return TYPICAL_SECONDS["local"] * (1 + min(max(longer, 0.0), 1.0))


def _outputs_fill_up(free: tuple[Path, int] | None, margin: int, results_bytes: int, largest: int) -> list[str]:
    """Whether the results to be made would fill the output folder's disk (`free`: it, and
    its free space) before the last of them: a row's result is a whole copy of its
    recording (a hundred variations of an hour-long tape take a hundred hours' worth), but
    for rows whose edits go into one file, which keep their region and a second each side."""
    if free is None or results_bytes <= free[1] - margin:
        return []
    folder, nbytes = free
    return [
        f"The results would take up to {human_size(results_bytes)} in {folder}, where {human_size(nbytes)} is "
        f"free (a result is a whole copy of its recording, up to {human_size(largest)}, but for rows whose edits "
        "go into one file, which keep their region and a second each side): once the disk is full, the "
        "rows left are refused before they are sent; free some space, or set output.uri to a larger disk "
        "(or a bucket)."
    ]


def _short_of_disk(room: DiskRoom, result_bytes: int, answer_bytes: int, row_id: str) -> list[str]:
    """What the run would refuse for want of disk space, going by the largest result."""
    lacking = room.lacks(result_bytes, answer_bytes) if row_id else None
    if lacking is None:
        return []
    return [
        f"The run would refuse row {row_id} before sending it (and any other whose result is as large): "
        f"{lacking}; free some space, or set runs_dir (or output.uri) to a larger disk."
    ]


def _file_short_of_disk(room: DiskRoom, nbytes: int, name: str) -> list[str]:
    """Whether the largest file holding several rows' edits could not be made once its rows
    are done (it is written whole; the rows' own results are excerpts, far smaller)."""
    lacking = room.lacks(nbytes, what="the file") if name else None
    if lacking is None:
        return []
    return [
        f"{name}, the file holding several rows' edits, would not be made once they are done: {lacking}; the "
        "rows' results are kept, so free some space (or set runs_dir, or output.uri, to a larger disk) and run "
        "it again with the same --run-id to make it at no cost."
    ]


def _unready(batch: Batch, providers: dict[str, int]) -> list[str]:
    """What would stop the run before its first row, for providers it would send to (a
    key not set, no staging prefix): an estimate touches no provider, so it says so here."""
    notes = []
    for name in providers:
        try:
            batch.provider_named(name).ready()
        except ConfigError as exc:
            why = str(exc).rstrip(".")
            notes.append(f"The run itself would stop before sending anything: {why[:1].lower()}{why[1:]}.")
    return notes
