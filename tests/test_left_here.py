"""What stopped runs on this machine paid for and never collected (soundpatch/left_here.py)."""

from __future__ import annotations

import json

from soundpatch.answers import AnswerShelf
from soundpatch.journal import Journal
from soundpatch.left_here import LEFT_CACHE, LeftHere
from soundpatch.locks import RunLock
from soundpatch.providers import PaidAnswer


def paid(runs, run: str, row: str, identity: str, prediction: str, used: bool = False) -> None:
    journal = Journal(runs / run)
    journal.write("sending", row, provider="eachlabs", request="q-" + identity, identity=identity, clip={})
    journal.write("creating", row)
    journal.write("created", row, prediction_id=prediction)
    if used:
        journal.write("outcome", row, outcome={"row_id": row, "status": "succeeded", "cost_usd": 0.2})
    journal.close()


def test_a_stopped_runs_unused_predictions_are_found_once_each_and_its_journal_read_once(tmp_path):
    runs = tmp_path / "runs"
    paid(runs, "stopped", "r1", "edit-1", "p1")
    paid(runs, "stopped", "r2", "edit-2", "p2", used=True)  # its result is out: nothing left
    paid(runs, "going", "r3", "edit-3", "p3")  # a process runs it (this one, here)
    paid(runs, "new", "r4", "edit-4", "p4")  # the run looking: its own are its own
    paid(runs, "stopped", "r5", "edit-5", "p5")  # a row failed using it: kept for that run's rerun
    journal = Journal(runs / "stopped")
    kept = {"prediction_id": "p5", "answer": None}
    journal.write("outcome", "r5", outcome={"row_id": "r5", "status": "failed", "cost_usd": 0.2}, kept_paid=kept)
    journal.close()
    going = RunLock(runs / "going").acquire()
    try:
        left = LeftHere(runs, "new")
    finally:
        going.release()
    assert [left.has(i) for i in ("edit-1", "edit-2", "edit-3", "edit-4", "edit-5")] == [True] + [False] * 4
    first = left.left_by("edit-1")
    assert (first.run, first.prediction_id, first.provider) == ("stopped", "p1", "eachlabs")
    assert left.left_by("edit-1") is None  # collected once
    left.was_collected(first)
    assert left.note().startswith("1 result was made from predictions that run stopped paid for and never collected")

    # What a journal left is kept by its size and time: unchanged, it is not read again ...
    cache = json.loads((runs / LEFT_CACHE).read_text())
    assert sorted(cache) == ["stopped"]  # (a run going now is looked at again next time)
    cache["stopped"]["left"] = {"edit-9": ["p9", "eachlabs"]}
    (runs / LEFT_CACHE).write_text(json.dumps(cache))
    assert LeftHere(runs, "new").has("edit-9")
    # Taken up again by a process (resumed), its journal unchanged yet: not offered meanwhile.
    resumed = RunLock(runs / "stopped").acquire()
    try:
        assert not LeftHere(runs, "new").has("edit-9")
    finally:
        resumed.release()
    # ... and once the run went on (its row used the prediction), it is.
    journal = Journal(runs / "stopped")
    journal.write("outcome", "r1", outcome={"row_id": "r1", "status": "succeeded", "cost_usd": 0.2})
    journal.close()
    again = LeftHere(runs, "new")
    assert not again.has("edit-9") and not again.has("edit-1") and again.has("edit-3")


def test_a_prediction_another_run_took_up_is_not_offered_again(tmp_path):
    # Taken up by a run that then failed with it (expired at the provider, say), it would
    # be offered to every run after, each failing the same way.
    runs = tmp_path / "runs"
    paid(runs, "stopped", "r1", "edit-1", "p1")
    paid(runs, "stopped", "r2", "edit-2", "p2")
    journal = Journal(runs / "took-it")
    journal.write("sending", "x", provider="eachlabs", request="q", identity="edit-1", clip={}, settled=True)
    journal.write("created", "x", prediction_id="p1", resumed=True, from_run="stopped")
    journal.write("outcome", "x", outcome={"row_id": "x", "status": "failed", "cost_usd": 0.0})
    journal.close()
    left = LeftHere(runs, "new")
    assert not left.has("edit-1") and left.has("edit-2")
    # Taken up by a run that was killed before it was used: that run offers it.
    journal = Journal(runs / "took-it-and-died")
    journal.write("sending", "y", provider="eachlabs", request="q", identity="edit-2", clip={}, settled=True)
    journal.write("created", "y", prediction_id="p2", resumed=True, from_run="stopped")
    journal.close()
    offered = LeftHere(runs, "new").left_by("edit-2")
    assert (offered.run, offered.prediction_id) == ("took-it-and-died", "p2")
    # A run taking up its own prediction again (a resume) does not count as another's.
    paid(runs, "resumed", "r3", "edit-3", "p3")
    journal = Journal(runs / "resumed")
    journal.write("sending", "r3", provider="eachlabs", request="q-edit-3", identity="edit-3", clip={})
    journal.write("created", "r3", prediction_id="p3", resumed=True)
    journal.close()
    assert LeftHere(runs, "new").has("edit-3")


def sent_unanswered(runs, run: str, row: str, identity: str, ended: bool = False, **sending) -> None:
    """A create for `identity` went out and its answer never came (the run was killed with
    it out; or, `ended`, it timed out and the row failed, counted as spent)."""
    journal = Journal(runs / run)
    journal.write("sending", row, provider="stability", request="q-" + identity, identity=identity, clip={}, **sending)
    journal.write("creating", row)
    if ended:
        journal.write("outcome", row, outcome={"row_id": row, "status": "failed", "cost_usd": 0.2, "attempts": 1})
    journal.close()


def test_a_stopped_runs_creates_in_doubt_hold_for_every_later_run_until_one_sends_them_again(tmp_path):
    runs = tmp_path / "runs"
    sent_unanswered(runs, "killed", "r1", "edit-1")  # killed with the create out
    sent_unanswered(runs, "timed-out", "r2", "edit-2", ended=True)  # the row failed in doubt; the run ended
    paid(runs, "answered", "r3", "edit-3", "p3", used=True)  # its answer came: nothing in doubt
    sent_unanswered(runs, "redone", "r4", "edit-4")  # in doubt, then its own rerun was told to send it again
    journal = Journal(runs / "redone")
    journal.write("sending", "r4", provider="stability", request="q-edit-4", identity="edit-4", clip={})
    journal.write("creating", "r4")
    journal.write("answered", "r4", status=200)
    journal.write("outcome", "r4", outcome={"row_id": "r4", "status": "succeeded", "cost_usd": 0.4, "attempts": 2})
    journal.close()
    sent_unanswered(runs, "going", "r5", "edit-5")  # a process runs it now: its create is simply out
    going = RunLock(runs / "going").acquire()
    try:
        here = LeftHere(runs, "new")
    finally:
        going.release()
    found = {i: here.doubted_by(i) for i in ("edit-1", "edit-2", "edit-3", "edit-4", "edit-5")}
    assert found == {"edit-1": ["killed"], "edit-2": ["timed-out"], "edit-3": [], "edit-4": [], "edit-5": []}
    assert not any(here.has(i) for i in found)  # nothing to collect: no id came back
    assert here.doubted_by("edit-1") == ["killed"]  # not taken up once like a prediction: it holds
    assert here.doubt_note() == ""
    here.not_sent("killed")
    assert here.doubt_note().startswith("1 row of edits that run killed sent and never heard back from was not sent")
    assert json.loads((runs / LEFT_CACHE).read_text())["killed"]["doubt"] == ["edit-1"]  # read once
    # A run's own are its own (its rerun says so itself).
    assert LeftHere(runs, "killed").doubted_by("edit-1") == []

    # A later run told to send it again (provider.resubmit_in_doubt) clears that run's doubt
    # for the runs after it.
    sent_unanswered(runs, "told-to", "x", "edit-1", resent_doubt=["killed"])
    journal = Journal(runs / "told-to")
    journal.write("answered", "x", status=200)
    journal.write("outcome", "x", outcome={"row_id": "x", "status": "succeeded", "cost_usd": 0.2, "attempts": 1})
    journal.close()
    after = LeftHere(runs, "newer")
    assert after.doubted_by("edit-1") == [] and after.doubted_by("edit-2") == ["timed-out"]
    # Sent again and in doubt once more: that run's own doubt holds.
    sent_unanswered(runs, "unlucky", "y", "edit-2", resent_doubt=["timed-out"])
    assert LeftHere(runs, "newest").doubted_by("edit-2") == ["unlucky"]


def test_a_paid_answer_a_stopped_run_kept_is_offered_once_while_its_file_is_there(tmp_path):
    # Stability gives no prediction id: what a killed run paid for is the answer it kept.
    runs = tmp_path / "runs"
    for run, row, identity in (("killed", "r1", "edit-1"), ("killed", "r2", "edit-2"), ("used", "r3", "edit-3")):
        journal = Journal(runs / run)
        journal.write("sending", row, provider="stability", request="q-" + identity, identity=identity, clip={})
        journal.write("creating", row)
        journal.write("answered", row, status=200)
        kept = AnswerShelf(runs / run).keep(row, PaidAnswer(b"RIFF...", 0.2, None))
        journal.write("answer_kept", row, **kept)
        journal.close()
    AnswerShelf(runs / "killed").discard("r2")  # its file is gone: lost, as good as in doubt
    journal = Journal(runs / "used")
    journal.write("outcome", "r3", outcome={"row_id": "r3", "status": "succeeded", "cost_usd": 0.2})
    journal.close()
    here = LeftHere(runs, "new")
    left = here.left_by("edit-1")
    assert (left.run, left.prediction_id, left.provider) == ("killed", "", "stability")
    assert AnswerShelf(runs / "killed").load(left.answer).data == b"RIFF..."
    assert not here.has("edit-2") and here.doubted_by("edit-2") == ["killed"]
    assert not here.has("edit-3") and here.doubted_by("edit-3") == []
    # Taken up by a run (a copy in its own answers, journaled with where it came from): not
    # offered again, but by that run, should it stop before using it.
    journal = Journal(runs / "took-it")
    journal.write("sending", "x", provider="stability", request="q", identity="edit-1", clip={}, settled=True)
    copy = AnswerShelf(runs / "took-it").keep("x", PaidAnswer(b"RIFF...", 0.2, None))
    journal.write("answer_kept", "x", **copy, resumed=True, from_run="killed", from_file=left.answer["file"])
    journal.close()
    offered = LeftHere(runs, "newer").left_by("edit-1")
    assert offered.run == "took-it" and offered.answer["file"] == copy["file"]


def test_a_paid_answer_a_row_failed_using_is_its_runs_own_and_in_doubt_for_all_once_its_file_is_gone(tmp_path):
    # The row failed using its paid answer (its price is in the outcome), kept for the run's
    # own rerun: another run is not offered it. Once its file is gone the answer is lost: the
    # run's own rerun does not pay for the edit again unless told (earlier_attempts.py), and
    # no other run does either.
    from soundpatch.earlier_attempts import read_earlier_attempts

    runs = tmp_path / "runs"
    journal = Journal(runs / "failed")
    journal.write("sending", "r1", provider="stability", request="q-1", identity="edit-1", clip={})
    journal.write("creating", "r1")
    journal.write("answered", "r1", status=200)
    kept = AnswerShelf(runs / "failed").keep("r1", PaidAnswer(b"RIFF...", 0.2, None))
    journal.write("answer_kept", "r1", **kept)
    outcome = {"row_id": "r1", "status": "failed", "cost_usd": 0.2, "attempts": 1}
    journal.write("outcome", "r1", outcome=outcome, kept_paid={"answer": kept})
    journal.close()
    here = LeftHere(runs, "new")
    assert not here.has("edit-1") and here.doubted_by("edit-1") == []
    AnswerShelf(runs / "failed").discard("r1")
    assert LeftHere(runs, "newer").doubted_by("edit-1") == ["failed"]
    states, _ = read_earlier_attempts(runs / "failed", "failed", None, AnswerShelf(runs / "failed"), False)
    assert states["r1"].doubted and states["r1"].answer is None and not states["r1"].in_doubt
