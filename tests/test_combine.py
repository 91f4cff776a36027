"""One file for a recording's rows (soundpatch/combine.py): the overlay and what the run says.

The end-to-end stories are in test_cli_run (the restoration example, a file lacking a
row) and test_storage (a bucket, a hosted model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from soundpatch.audio import Audio, ReadBack, encode, read_back
from soundpatch.combine import CombinedFile, combined_note, overlay
from soundpatch.config import load_config
from soundpatch.errors import RowError
from soundpatch.outcome import Outcome
from tests.jobs import run_in_process


def pcm16(seed: int, frames: int = 1000, channels: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(-20000, 20000, (frames, channels)).astype(np.int16)


def written(result: Audio, a: int, b: int) -> ReadBack:
    """A row's result as the run takes it for a combined file: written, then its region read back."""
    return read_back(encode(result, "WAV"), a, b)


def test_each_region_comes_from_its_own_result_and_the_rest_from_the_input():
    original = Audio(pcm16(0), 8000, "WAV", "PCM_16")
    first, second = Audio(pcm16(1), 8000, "WAV", "PCM_16"), Audio(pcm16(2), 8000, "WAV", "PCM_16")
    parts = [("b", written(second, 700, 750), 700, 750), ("a", written(first, 100, 200), 100, 200)]
    out = overlay(original, parts).audio().samples
    assert np.array_equal(out[100:200], first.samples[100:200])
    assert np.array_equal(out[700:750], second.samples[700:750])
    rest = np.ones(1000, bool)
    rest[100:200] = rest[700:750] = False
    assert np.array_equal(out[rest], original.samples[rest])
    assert np.array_equal(original.samples, pcm16(0))  # the input itself is left alone


def test_a_result_in_another_sample_format_is_brought_to_the_input_s():
    original = Audio(pcm16(0), 8000, "WAV", "PCM_16")
    lossy = Audio((pcm16(3) / 32768).astype(np.float32), 8000, "OGG", "VORBIS")  # as an Ogg decodes
    out = overlay(original, [("a", written(lossy, 10, 20), 10, 20)]).audio().samples
    assert out.dtype == np.int16 and np.array_equal(out[10:20], pcm16(3)[10:20])
    assert np.array_equal(out[20:], original.samples[20:])


def test_a_result_of_another_length_is_refused_with_the_row_named():
    original = Audio(pcm16(0), 8000, "WAV", "PCM_16")
    with pytest.raises(RowError, match="row short's result has 900 frames of 2 channels where its input has 1000"):
        overlay(original, [("short", written(Audio(pcm16(1, frames=900), 8000, "WAV", "PCM_16"), 10, 20), 10, 20)])


def test_the_notes_say_what_was_made_what_lacks_a_row_and_what_was_not_made():
    notes = combined_note(
        [
            CombinedFile("fixed/a.wav", output="/o/fixed/a.wav", rows=["x", "y"]),
            CombinedFile("fixed/b.wav", output="/o/fixed/b.wav", rows=["z"], missing=["w (failed)"]),
            CombinedFile("fixed/c.wav", missing=["v (invalid)"], error="None of its rows finished."),
        ]
    )
    assert notes == [
        "2 files hold the edits of several rows of one recording each: fixed/a.wav (2 rows), fixed/b.wav "
        "(1 row); each row's own result (its region and a second each side) is beside it in <name>.rows/.",
        "fixed/b.wav holds 1 of its 2 rows' edits: w (failed) did not finish, so its region is as in the "
        "input; mend or run them again with the same --run-id to complete it.",
        "fixed/c.wav was not made. None of its rows finished.",
    ]
    assert combined_note([]) == []


def test_a_row_s_own_result_is_its_region_with_a_second_each_side_and_whole_again_where_asked(tmp_path):
    # A restoration batch's rows each kept a whole copy of their recording beside the file
    # holding all their edits: 40 dropouts of a 30-minute tape took 13 GB. A row of such a
    # file now keeps its region and a second each side; the same edit asked for under a
    # name of its own is made whole again from the recording, bit for bit and at no cost,
    # and whole results (as earlier runs made them) still go into a combined file.
    rate = 8000
    source = np.random.default_rng(5).integers(-9000, 9000, (rate * 10, 2)).astype(np.int16)
    sf.write(tmp_path / "reel.wav", source, rate, subtype="PCM_16")
    regions = [(16000, 16400), (52000, 52800)]

    def run(out: str, outputs: str, run_id: str) -> list[Outcome]:
        rows = [f"hiss,reel.wav,2,2.05,room tone,1,{out}", f"thud,reel.wav,6.5,6.6,room tone,2,{out}"]
        (tmp_path / "m.csv").write_text("id,input,start,end,prompt,seed,output\n" + "\n".join(rows) + "\n")
        cfg = load_config(overrides={"output.uri": str(tmp_path / outputs), "runs_dir": str(tmp_path / "runs")})
        return run_in_process(tmp_path / "m.csv", cfg, run_id)[0]

    combined = run("restored/{stem}", "out", "one")
    assert [o.status for o in combined] == ["succeeded", "succeeded"], [o.error for o in combined]
    fixed = sf.read(combined[0].combined, dtype="int16")[0]
    for o, (a, b) in zip(combined, regions, strict=True):
        own = sf.read(o.output, dtype="int16")[0]
        assert np.array_equal(own, np.concatenate([source[a - rate : a], fixed[a:b], source[b : b + rate]]))
        assert json.loads(Path(o.output + ".json").read_text())["excerpt_frames"] == f"{a - rate}-{b + rate}/80000"

    whole = run("whole/{row_id}", "out", "two")  # the same edits, each under its own name
    assert [o.status for o in whole] == ["skipped_done", "skipped_done"], [o.error for o in whole]
    for o, (a, b) in zip(whole, regions, strict=True):
        own = sf.read(o.output, dtype="int16")[0]
        assert np.array_equal(own[a:b], fixed[a:b]) and not np.array_equal(own[a:b], source[a:b])
        assert np.array_equal(own[:a], source[:a]) and np.array_equal(own[b:], source[b:])
        assert "excerpt_frames" not in json.loads(Path(o.output + ".json").read_text())

    first = run("whole/{row_id}", "elsewhere", "three")  # whole results first, then the file of both
    assert [o.status for o in first] == ["succeeded", "succeeded"]
    then = run("restored/{stem}", "elsewhere", "four")
    assert [o.status for o in then] == ["skipped_done", "skipped_done"], [o.error for o in then]
    assert np.array_equal(sf.read(then[0].combined, dtype="int16")[0], fixed)
