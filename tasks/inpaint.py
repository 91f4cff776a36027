"""The one task of a batch: process one edit (validate, reserve, inpaint, splice, publish)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from soundpatch.batch import Batch
from soundpatch.edits import Edit
from soundpatch.outcome import Outcome


# No Prefect retries here: retrying a paid call is the provider layer's decision, made
# with the ledger and the journal in hand, never a blind re-run of the whole row.
# No caching either: reuse of results is decided by the output store, not by Prefect.
@task(name="inpaint-row", task_run_name="row {edit.row_id}", cache_policy=NO_CACHE)
def inpaint_row(batch: Batch, edit: Edit) -> Outcome:
    return batch.process(edit)
