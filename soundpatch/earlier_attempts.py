"""What earlier attempts of a run left, read before it goes on (`--run-id`): each row's
state as the run's journal tells it (journal.py), with what the journal's copy in the
bucket knows and this machine's journal does not (the run began on another machine, or in
a container that is gone; another machine went on with it since; this machine's disk
filled up under it), so that nothing either says was paid for is paid for again."""

from __future__ import annotations

from pathlib import Path

from soundpatch.answers import AnswerShelf
from soundpatch.errors import RowError
from soundpatch.humanize import plural
from soundpatch.journal import RowState, lines_here, lose_answers, merge, parse, restore, row_states, states_from
from soundpatch.journal_copy import JournalCopy


def read_earlier_attempts(
    run_dir: Path, run_id: str, copy: JournalCopy | None, answers: AnswerShelf, restore_here: bool
) -> tuple[dict[str, RowState], str]:
    """The rows' states, and what the start made of the journal's copy ("" when it added
    nothing). `restore_here`: the journal merged with the copy becomes this machine's (not
    for a dry run). A paid answer whose kept file is gone is lost, like a create that was
    never answered."""
    copied, said = _copied_journal(run_dir, run_id, copy)
    if copied and restore_here:
        restore(run_dir, copied)  # this machine's journal of the run from now on
    states = states_from(parse(copied)) if copied else row_states(run_dir)
    return lose_answers(states, answers.exists), said


def _copied_journal(run_dir: Path, run_id: str, copy: JournalCopy | None) -> tuple[list[str], str]:
    """The run's journal with what its copy in the bucket has and this machine's has not,
    and what to say of it; [] when that is nothing."""
    if copy is None:
        return [], ""
    try:
        there = copy.lines()
    except RowError as exc:
        return [], (
            f"The journal's copy in the bucket could not be read ({exc}); had run {run_id} gone on "
            "another machine, what it paid for there would not be known here."
        )
    if not there:  # a new run, or one whose outputs were never in this bucket
        return [], ""
    here = lines_here(run_dir)
    merged, rows = merge(here, there)
    if not rows:
        return [], ""
    if not here:
        return merged, (
            f"This machine had no journal of run {run_id}: it went on from the journal's copy in the "
            f"bucket ({plural(len(rows), 'row')} begun elsewhere)."
        )
    return merged, (
        f"The journal's copy in the bucket knew more of {plural(len(rows), 'row')} than this machine's "
        f"journal of run {run_id} (another machine went on with the run, or this one's disk filled up "
        "under it): the run went on from both, so nothing either says was paid for is paid for again."
    )
