"""One file for a recording's rows (soundpatch/combine.py): the overlay and what the run says.

The end-to-end stories are in test_cli_run (the restoration example, a file lacking a
row) and test_storage (a bucket, a hosted model)."""

from __future__ import annotations

import numpy as np
import pytest

from soundpatch.audio import Audio, ReadBack, encode, read_back
from soundpatch.combine import CombinedFile, combined_note, overlay
from soundpatch.errors import RowError


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
        "(1 row); each row's own result is beside it in <name>.rows/.",
        "fixed/b.wav holds 1 of its 2 rows' edits: w (failed) did not finish, so its region is as in the "
        "input; mend or run them again with the same --run-id to complete it.",
        "fixed/c.wav was not made. None of its rows finished.",
    ]
    assert combined_note([]) == []
