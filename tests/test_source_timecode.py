"""Regions in a recording's own timecode (`timecode: source`), as edit lists give them.

A broadcast WAV says when its first sample was recorded: its bext chunk's time reference,
in samples since midnight (a field recorder's iXML chunk says it too, where a file has no
bext). An edit decision list, or a restorer's notes taken against a DAW's session, gives
a dropout at `01:00:12:05` of a reel whose first sample is at `01:00:00:00`: twelve
seconds in, not an hour. Before, such times were counted from the file's first sample
only, and a user had to subtract each file's start by hand.

The recordings here are built chunk by chunk (tests/test_metadata.py's helpers) and run
through the batch as `soundpatch run` runs it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import soundfile as sf

from soundpatch import metadata
from soundpatch.config import load_config
from tests.jobs import clean_env, run_in_process, soundpatch
from tests.test_metadata import BEXT, RATE, chunk, comments, flac_with, outside_is_the_same, pcm, wav_bytes, with_chunks


def bext_at(samples: int) -> bytes:
    """BEXT with another time reference."""
    return BEXT[:338] + struct.pack("<Q", samples) + BEXT[346:]


def ixml(*fields: tuple[str, str, int], padded: int = 0) -> bytes:
    """An iXML chunk as a field recorder writes one: its fields grouped under their sections
    ((section, name, value)), besides scene and take, null-padded to leave room for edits."""
    sections: dict[str, str] = {}
    for section, name, value in fields:
        sections[section] = sections.get(section, "") + f"<{name}>{value}</{name}>\n"
    inner = "".join(f"<{section}>\n{body}</{section}>\n" for section, body in sections.items())
    text = f'<?xml version="1.0" encoding="UTF-8"?>\n<BWFXML>\n<SCENE>12</SCENE>\n{inner}</BWFXML>\n'
    return text.encode() + bytes(padded)


def run(tmp_path: Path, rows: list[str], **overrides: str) -> dict:
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt,fps,timecode,output\n" + "\n".join(rows) + "\n")
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs"), **overrides})
    return {o.row_id: o for o in run_in_process(tmp_path / "m.csv", cfg, "tc")[0]}


def test_rows_in_a_recording_s_own_timecode_are_edited_where_its_time_stamp_puts_them(tmp_path):
    source = pcm(3.0)
    (tmp_path / "reel.wav").write_bytes(with_chunks(wav_bytes(source), [(b"bext", BEXT)], []))
    (tmp_path / "plain.wav").write_bytes(wav_bytes(source))
    # Recorded from 23:59:30 into the next day: a minute, half of it after midnight.
    night = pcm(60.0, 1, seed=1)
    (tmp_path / "night.wav").write_bytes(with_chunks(wav_bytes(night), [(b"bext", bext_at(86_370 * RATE))], []))
    # A FLAC made from a broadcast WAV keeps its time reference as a tag.
    tagged = flac_with(
        wav_bytes(source, format="FLAC"), [(4, comments(b"reference libFLAC", "TITLE=Reel", "time_reference=28800000"))]
    )
    (tmp_path / "reel.flac").write_bytes(tagged)
    # A field recorder's file with no bext: its iXML's time stamp, stamped 01:00:00:00.
    field_stamp = ixml(
        ("SPEED", "TIMESTAMP_SAMPLES_SINCE_MIDNIGHT_LO", 3600 * RATE), ("SPEED", "TIMESTAMP_SAMPLE_RATE", RATE)
    )
    (tmp_path / "field.wav").write_bytes(with_chunks(wav_bytes(source), [(b"iXML", field_stamp)], []))

    outcomes = run(
        tmp_path,
        [
            "frames,reel.wav,01:00:01:00,01:00:01:12,room tone,25,source,a",  # 1.0-1.48 s into the file
            "seconds,reel.wav,3602,3602.5,room tone,,source,b",  # its own time, in seconds: 2.0-2.5
            "elapsed,reel.wav,0.5,0.6,room tone,,,c",  # counted from its first sample, as before
            "early,reel.wav,00:59:59:00,01:00:00:12,room tone,25,source,d",
            "no_stamp,plain.wav,01:00:01:00,01:00:01:12,room tone,25,source,e",
            "unknown,reel.wav,1.0,1.5,room tone,,session,f",
            "after_midnight,night.wav,00:00:10,00:00:10.5,room tone,,source,g",  # 40.0-40.5 s into it
            "flac,reel.flac,01:00:02.0,01:00:02.25,room tone,,source,h",
            "ixml,field.wav,01:00:00:10,01:00:00:20,room tone,25,source,i",  # 0.4-0.8 s into it
        ],
    )

    said = {row: (o.status, o.start, o.end) for row, o in outcomes.items() if o.status == "succeeded"}
    assert said == {
        "frames": ("succeeded", 1.0, 1.48),
        "seconds": ("succeeded", 2.0, 2.5),
        "elapsed": ("succeeded", 0.5, 0.6),
        "after_midnight": ("succeeded", 40.0, 40.5),
        "flac": ("succeeded", 2.0, 2.25),
        "ixml": ("succeeded", 0.4, 0.8),
    }
    outside_is_the_same(Path(outcomes["frames"].output), source, 1.0, 1.48)
    outside_is_the_same(Path(outcomes["seconds"].output), source, 2.0, 2.5)
    outside_is_the_same(Path(outcomes["flac"].output), source, 2.0, 2.25)
    outside_is_the_same(Path(outcomes["ixml"].output), source, 0.4, 0.8)
    edited = sf.read(outcomes["frames"].output, dtype="int16", always_2d=True)[0]
    assert not np.array_equal(edited[8000:11840], source[8000:11840])  # the region itself was redone
    result = sf.read(outcomes["after_midnight"].output, dtype="int16", always_2d=True)[0]
    assert np.array_equal(result[: 40 * RATE], night[: 40 * RATE])
    assert np.array_equal(result[int(40.5 * RATE) :], night[int(40.5 * RATE) :])
    assert not np.array_equal(result[40 * RATE : int(40.5 * RATE)], night[40 * RATE : int(40.5 * RATE)])

    refused = {row: (o.status, o.cost_usd, o.error) for row, o in outcomes.items() if o.status != "succeeded"}
    assert refused == {
        "early": (
            "invalid",
            0.0,
            "Region starts at 00:59:59.000, before reel.wav begins at 01:00:00.000 (its time stamp).",
        ),
        "no_stamp": (
            "invalid",
            0.0,
            "Its times are source timecode (timecode: source) but plain.wav has no time stamp to count them from "
            "(a broadcast WAV's bext time reference, or a field recorder's iXML time stamp); give them from its "
            "first sample (timecode: elapsed).",
        ),
        "unknown": (
            "invalid",
            0.0,
            "Timecode 'session' is neither elapsed (counted from the recording's first sample) nor source "
            "(the recording's own timecode, from its time stamp).",
        ),
    }


def test_a_time_stamp_is_read_from_a_file_s_bext_or_flac_tags_and_none_from_others(tmp_path):
    source = pcm(0.5)
    (tmp_path / "bwf.wav").write_bytes(with_chunks(wav_bytes(source), [(b"bext", bext_at(12345))], []))
    rf64 = wav_bytes(source, format="RF64")
    at = rf64.index(b"data")  # libsndfile's RF64 says its data's size in its ds64 chunk
    (tmp_path / "rf64.wav").write_bytes(rf64[:at] + chunk(b"bext", bext_at(7)) + rf64[at:])
    (tmp_path / "short.wav").write_bytes(with_chunks(wav_bytes(source), [(b"bext", BEXT[:300])], []))  # no room for one
    (tmp_path / "plain.wav").write_bytes(wav_bytes(source))
    (tmp_path / "plain.aiff").write_bytes(wav_bytes(source, format="AIFF"))
    plain_flac = wav_bytes(source, format="FLAC")
    (tmp_path / "tagged.flac").write_bytes(
        flac_with(plain_flac, [(4, comments(b"reference libFLAC", "Time_Reference=96000"))])
    )
    (tmp_path / "untagged.flac").write_bytes(flac_with(plain_flac, [(4, comments(b"reference libFLAC", "TITLE=x"))]))
    (tmp_path / "cut.flac").write_bytes(
        flac_with(plain_flac, [(4, comments(b"reference libFLAC", "TIME_REFERENCE=5")[:-3])])
    )

    # A field recorder's iXML, where the file has no bext: its copy of the bext time
    # reference, or its own time stamp (in samples at its TIMESTAMP_SAMPLE_RATE: 48048 Hz,
    # a file pulled down to 48000 Hz, is 1001 of its samples to 1000 of the file's).
    stamp = [("SPEED", "TIMESTAMP_SAMPLES_SINCE_MIDNIGHT_HI", 1), ("SPEED", "TIMESTAMP_SAMPLES_SINCE_MIDNIGHT_LO", 5)]
    pulled = [("SPEED", "FILE_SAMPLE_RATE", 48000), ("SPEED", "TIMESTAMP_SAMPLE_RATE", 48048)]
    bwf_copy = [("BEXT", "BWF_TIME_REFERENCE_LOW", 960000), ("BEXT", "BWF_TIME_REFERENCE_HIGH", 0)]
    ixml_files = {
        "ixml.wav": ixml(*stamp, padded=4000),
        "ixml_bext_copy.wav": ixml(("SPEED", "TIMESTAMP_SAMPLES_SINCE_MIDNIGHT_LO", 77), *bwf_copy),
        "ixml_pulled.wav": ixml(("SPEED", "TIMESTAMP_SAMPLES_SINCE_MIDNIGHT_LO", 48048 * 3600), *pulled),
        "ixml_no_stamp.wav": ixml(
            ("SPEED", "TIMECODE_RATE", "25/1"), ("SPEED", "TIMESTAMP_SAMPLES_SINCE_MIDNIGHT_LO", "")
        ),
    }
    for name, body in ixml_files.items():
        (tmp_path / name).write_bytes(with_chunks(wav_bytes(source), [], [(b"iXML", body)]))
    # Both: the bext's time reference is the one (the iXML only copies it).
    (tmp_path / "both.wav").write_bytes(
        with_chunks(wav_bytes(source), [(b"iXML", ixml(*stamp)), (b"bext", bext_at(9))], [])
    )

    found = {p.name: metadata.file_time_reference(p) for p in sorted(tmp_path.iterdir())}
    assert found == {
        "both.wav": 9,
        "bwf.wav": 12345,
        "ixml.wav": (1 << 32) + 5,
        "ixml_bext_copy.wav": 960000,
        "ixml_no_stamp.wav": None,
        "ixml_pulled.wav": 48000 * 3600,
        "cut.flac": None,
        "plain.aiff": None,
        "plain.wav": None,
        "rf64.wav": 7,
        "short.wav": None,
        "tagged.flac": 96000,
        "untagged.flac": None,
    }


def test_a_bucket_s_broadcast_wav_gives_its_time_stamp_too(tmp_path, aws_env):
    source = pcm(3.0)
    aws_env.client.put_object(
        Bucket=aws_env.bucket("tapes"), Key="reel.wav", Body=with_chunks(wav_bytes(source), [(b"bext", BEXT)], [])
    )
    outcomes = run(
        tmp_path,
        ["a,s3://tapes/reel.wav,01:00:01:00,01:00:01:12,room tone,25,source,a"],
        **{"storage.s3.endpoint_url": aws_env.endpoint},
    )
    assert (outcomes["a"].status, outcomes["a"].start, outcomes["a"].end) == ("succeeded", 1.0, 1.48), outcomes["a"]
    outside_is_the_same(Path(outcomes["a"].output), source, 1.0, 1.48)


def test_validate_says_where_source_timecode_lands_and_why_a_row_cannot_be_placed(tmp_path):
    (tmp_path / "reel.wav").write_bytes(with_chunks(wav_bytes(pcm(3.0)), [(b"bext", BEXT)], []))
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt,fps,timecode\n"
        "a,reel.wav,01:00:01:00,01:00:01:12,room tone,25,source\n"
        "b,reel.wav,01:00:05:00,01:00:06:00,room tone,25,source\n"
    )
    done = soundpatch("validate", "m.csv", cwd=tmp_path, env=clean_env())
    assert done.returncode == 1, done.stdout + done.stderr  # rows invalid
    said = " ".join(done.stdout.split()).lower()
    assert "invalid 1" in said and "predictions to send 1" in said, said
    assert "invalid b (line 3): region starts at 5 s but reel.wav is only 3.000 s long" in said, said


def test_the_example_edl_restores_its_reel_where_its_timecode_says(tmp_path):
    manifest = Path(__file__).parent.parent / "manifests" / "reel_edl.csv"
    reel, rate = sf.read(manifest.parent / "reels" / "reel_interview.wav", dtype="int16", always_2d=True)
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")})
    outcomes = run_in_process(manifest, cfg, "edl")[0]
    assert [(o.row_id, o.status, o.start, o.end) for o in outcomes] == [
        ("reel3-dropout", "succeeded", 1.68, 1.76),  # 10:00:01:17-10:00:01:19 at 25 fps, from 10:00:00:00
        ("reel3-click", "succeeded", 3.04, 3.08),
    ], [o.error for o in outcomes]
    output = tmp_path / "out" / "edl" / "reel_interview.wav"  # both edits in one file of the reel
    result = sf.read(output, dtype="int16", always_2d=True)[0]
    outside = np.ones(len(reel), bool)
    outside[round(1.68 * rate) : round(1.76 * rate)] = outside[round(3.04 * rate) : round(3.08 * rate)] = False
    assert result.shape == reel.shape and np.array_equal(result[outside], reel[outside])
    assert metadata.file_time_reference(output) == 10 * 3600 * rate  # its bext came with it
