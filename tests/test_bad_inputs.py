"""A corpus of bad rows and bad files, all in one manifest, run as a user would run it.

Each must become that row's invalid outcome with a clear reason; nothing is sent for it,
the good rows still complete, and no traceback reaches the user.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from soundpatch.config import load_config
from tests.jobs import clean_env, run_in_process, seeded_prefect_home, soundpatch
from tests.test_mp3 import frame_starts, loud_then_quiet

SCRIPT = Path(sys.executable).parent / "soundpatch"


def make_files(d: Path, s3) -> None:
    rate = 16000
    tone = (0.2 * np.sin(2 * np.pi * 220 * np.arange(4 * rate) / rate)).astype(np.float32)[:, None]
    sf.write(d / "good.wav", tone, rate, subtype="PCM_16")
    sf.write(d / "good.flac", tone, rate, subtype="PCM_16")
    (d / "empty.wav").write_bytes(b"")
    (d / "text.wav").write_text("this is a text file pretending to be audio\n" * 20)
    good = (d / "good.wav").read_bytes()
    (d / "corrupt_header.wav").write_bytes(b"RIFX" + good[4:12] + b"\x00" * 32 + good[44:])
    (d / "truncated.flac").write_bytes((d / "good.flac").read_bytes()[:60])
    (d / "image.flac").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2000))
    sf.write(d / "no_frames.wav", np.zeros((0, 1), np.float32), rate)
    (d / "folder.wav").mkdir()
    # Copies broken off (at 2.5 s of 4 s for the WAV): their headers still promise 4 s.
    (d / "cut.wav").write_bytes(good[: 44 + round(2.5 * rate) * 2])
    (d / "cut.flac").write_bytes((d / "good.flac").read_bytes()[: (d / "good.flac").stat().st_size * 6 // 10])
    unfinished = bytearray(good)  # a recorder that stopped before writing the length: "data : 0"
    unfinished[4:8] = unfinished[good.index(b"data") + 4 : good.index(b"data") + 8] = bytes(4)
    (d / "unfinished.wav").write_bytes(unfinished)
    sf.write(d / "good.mp3", tone, rate)
    (d / "cut.mp3").write_bytes((d / "good.mp3").read_bytes()[: (d / "good.mp3").stat().st_size * 6 // 10])
    # MP3s without the tag that says their length: one from its start (read whole: libsndfile
    # alone read 0.648 s of it), one cut out of a stream at a frame whose data begins before it.
    for name, loud, frame in (("untagged.mp3", 0.05, 1), ("stream_cut.mp3", 1.5, 20)):
        tagged = io.BytesIO()
        sf.write(tagged, loud_then_quiet(4.0, rate, 1, loud), rate, format="MP3")
        (d / name).write_bytes(tagged.getvalue()[frame_starts(tagged.getvalue())[frame] :])
    s3.bucket("bad-inputs")
    s3.client.put_object(Bucket="bad-inputs", Key="notaudio.wav", Body=b"hello")


CORPUS = {
    # id: (input, start, end, prompt, extra columns, expected words in the reason)
    "missing-file": ("nope.wav", "1", "2", "x", {}, "does not exist"),
    "zero-byte": ("empty.wav", "1", "2", "x", {}, "empty (0 bytes)"),
    "text-as-wav": ("text.wav", "1", "2", "x", {}, "Input file text.wav is not audio that can be decoded"),
    "corrupt-header": ("corrupt_header.wav", "1", "2", "x", {}, "not audio that can be decoded"),
    "truncated-flac": ("truncated.flac", "1", "2", "x", {}, "decoded"),
    "png-as-flac": ("image.flac", "1", "2", "x", {}, "not audio that can be decoded"),
    "no-frames": ("no_frames.wav", "0", "1", "x", {}, "no audio samples"),
    "a-folder": ("folder.wav", "1", "2", "x", {}, "is not a file"),
    "past-the-end": ("good.wav", "3", "9", "x", {}, "only 4.000 s long"),
    "starts-after-end-of-file": ("good.wav", "5", "6", "x", {}, "only 4.000 s long"),
    "cut-short-past-its-end": ("cut.wav", "3", "3.5", "x", {}, "breaks off at 2.500 s of the 4.000 s its header"),
    "cut-short-mp3-past-its-end": ("cut.mp3", "3", "3.5", "x", {}, "s of the 4.000 s its header promises"),
    "unfinished-past-its-end": ("unfinished.wav", "4.5", "5", "x", {}, "unfinished.wav is only 4.000 s long"),
    "cut-short-flac": ("cut.flac", "1", "1.1", "x", {}, "cut.flac cannot be decoded past 2."),
    "mp3-cut-from-a-stream": ("stream_cut.mp3", "1", "1.1", "x", {}, "cannot be read whole: it is an MP3 cut out"),
    "whole-recording-local": ("good.wav", "0", "4", "x", {}, "covers the whole recording"),
    "end-before-start": ("good.wav", "2", "1", "x", {}, "not after its start"),
    "zero-length": ("good.wav", "2", "2", "x", {}, "not after its start"),
    "shorter-than-a-sample": ("good.wav", "1.00001", "1.00002", "x", {}, "shorter than one sample"),
    "nan-start": ("good.wav", "nan", "2", "x", {}, "finite"),
    "inf-end": ("good.wav", "1", "inf", "x", {}, "finite"),
    "negative": ("good.wav", "-1", "2", "x", {}, "negative"),
    "huge-number": ("good.wav", "1", "1e300", "x", {}, "longer than a week"),
    "words-for-time": ("good.wav", "one", "2", "x", {}, "not a number of seconds"),
    "bad-timecode": ("good.wav", "1:75", "2", "x", {}, "not a valid timecode"),
    "empty-prompt": ("good.wav", "1", "2", "", {}, "prompt is empty"),
    "blank-prompt": ("good.wav", "1", "2", "   ", {}, "prompt is empty"),
    "50kb-prompt": ("good.wav", "1", "2", "y" * 50_000, {}, "limit is 2000"),
    "empty-input": ("", "1", "2", "x", {}, "input is empty"),
    "ftp-scheme": ("ftp://example.com/a.wav", "1", "2", "x", {}, "ftp:// is not supported"),
    "file-scheme": ("file:///etc/passwd", "1", "2", "x", {}, "file:// is not supported"),
    "unknown-provider": ("good.wav", "1", "2", "x", {"provider": "acme"}, "provider 'acme' is unknown"),
    "seed-not-whole": ("good.wav", "1", "2", "x", {"seed": "1.5"}, "seed '1.5' is not a whole number"),
    "seed-too-big": ("good.wav", "1", "2", "x", {"seed": "99999999999"}, "outside 0..4294967295"),
    "steps-words": ("good.wav", "1", "2", "x", {"steps": "many"}, "steps 'many' is not a whole number"),
    "guidance-nan": ("good.wav", "1", "2", "x", {"guidance_scale": "nan"}, "guidance_scale"),
    "variations-zero": ("good.wav", "1", "2", "x", {"variations": "0"}, "variations 0 is outside"),
    "variations-too-many": ("good.wav", "1", "2", "x", {"variations": "5000"}, "outside 1..1000"),
    "bad-output-template": ("good.wav", "1", "2", "x", {"output": "{nope}.wav"}, "output template"),
    "s3-missing-bucket": ("s3://no-such-bucket-here/a.wav", "1", "2", "x", {}, "does not exist"),
    "s3-missing-key": ("s3://bad-inputs/missing.wav", "1", "2", "x", {}, "no such object"),
    "s3-not-audio": ("s3://bad-inputs/notaudio.wav", "1", "2", "x", {}, "s3://bad-inputs/notaudio.wav is not audio"),
    "https-loopback": ("https://127.0.0.1:9/a.wav", "1", "2", "x", {}, "private or local address"),
    "https-metadata-service": ("http://169.254.169.254/latest/a.wav", "1", "2", "x", {}, "private or local address"),
    "pattern-matches-nothing": ("nothing/*.wav", "1", "2", "x", {}, "matches no files"),
    "s3-pattern-matches-nothing": ("s3://bad-inputs/none/*.wav", "1", "2", "x", {}, "matches no files"),
    "s3-pattern-missing-bucket": ("s3://no-such-bucket-here/*.wav", "1", "2", "x", {}, "does not exist"),
    "odd-encoding-id\u202e": ("good.wav", "1", "2", "x", {}, None),  # right-to-left mark: fine, kept
    "dup": ("good.wav", "1", "2", "first", {}, None),
    # another recording under the name good-3 has taken:
    "name-taken": ("good.flac", "3", "3.5", "x", {"output": "shared"}, "also the name of row good-3's result"),
}
DUPLICATE = ("dup", "good.wav", "1.5", "2", "second")


def test_each_kind_of_bad_input_is_reported_and_the_rest_completes(tmp_path, aws_env, tmp_path_factory):
    make_files(tmp_path, aws_env)
    columns = [
        "id",
        "input",
        "start",
        "end",
        "prompt",
        "provider",
        "seed",
        "steps",
        "guidance_scale",
        "variations",
        "output",
    ]
    rows = [
        {"id": "good-1", "input": "good.wav", "start": "1", "end": "1.1", "prompt": "fill"},
        {"id": "good-2", "input": "good.flac", "start": "0:02", "end": "0:02.5", "prompt": "fill"},
        {"id": "good-3", "input": "good.wav", "start": "2.5", "end": "2.6", "prompt": "fill", "output": "shared"},
        {"id": "good-cut", "input": "cut.wav", "start": "1", "end": "1.1", "prompt": "fill"},
        {"id": "good-unfinished", "input": "unfinished.wav", "start": "1", "end": "1.1", "prompt": "fill"},
        {"id": "good-untagged", "input": "untagged.mp3", "start": "3", "end": "3.1", "prompt": "fill"},
    ]
    for row_id, (src, start, end, prompt, extra, _) in CORPUS.items():
        rows.append({"id": row_id, "input": src, "start": start, "end": end, "prompt": prompt, **extra})
    rows.append(dict(zip(["id", "input", "start", "end", "prompt"], DUPLICATE, strict=True)))
    rows.append({"id": "x" * 200, "input": "good.wav", "start": "1", "end": "2", "prompt": "long id"})
    pd.DataFrame(rows, columns=columns).fillna("").to_csv(tmp_path / "bad.csv", index=False)
    (tmp_path / "c.yaml").write_text(f"storage: {{s3: {{endpoint_url: '{aws_env.endpoint}'}}}}\n")

    home = seeded_prefect_home(tmp_path_factory.mktemp("prefect"))
    env = clean_env(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", PREFECT_HOME=str(home))
    proc = soundpatch("run", "bad.csv", "--config", "c.yaml", "--run-id", "bad", cwd=tmp_path, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr

    report = pd.read_csv(tmp_path / "runs" / "bad" / "report.csv", keep_default_na=False).set_index("row_id")
    kinds = 0
    for row_id, (*_, reason) in CORPUS.items():
        if reason is None:
            continue
        kinds += 1
        got = report.loc[row_id]
        assert got["status"] == "invalid", (row_id, got["error"])
        assert reason.lower() in got["error"].lower(), (row_id, got["error"])
        assert got["error"].endswith(".") and "\n" not in got["error"] and len(got["error"]) < 400
        assert not got["error"].endswith(("..", ".).")), (row_id, got["error"])  # one full stop
        assert float(got["cost_usd"]) == 0
    dupes = report[report["input"] == "good.wav"].loc[lambda r: r["prompt"] == "second"]
    assert dupes["status"].tolist() == ["invalid"] and "already used" in dupes["error"].iloc[0]
    long_id = report[report["prompt"] == "long id"]
    assert long_id["status"].tolist() == ["invalid"] and "longer than 128" in long_id["error"].iloc[0]
    assert kinds + 2 >= 30  # the corpus, the duplicate id and the long id

    good = ["good-1", "good-2", "good-3", "good-cut", "good-unfinished", "good-untagged"]
    good += ["odd-encoding-id\u202e", "dup"]
    for row_id in good:
        assert report.loc[row_id, "status"] == "succeeded", report.loc[row_id, "error"]
    # An MP3 without the tag that says its length is edited whole: its 4.104 s, all of it there.
    untagged = report.loc["good-untagged"]
    assert untagged["checks"] == "ok" and sf.info(untagged["output"]).frames == round(4.104 * 16000)
    # A recording cut short is edited as far as it goes, and says so; nothing else of it changes.
    cut = report.loc["good-cut"]
    assert cut["checks"] == "the input is cut short (it holds 2.500 s of the 4.000 s its header promises)"
    result, _ = sf.read(cut["output"], dtype="int16")
    before, _ = sf.read(tmp_path / "good.wav", dtype="int16")
    assert len(result) == 40000 and np.array_equal(result[:16000], before[:16000])
    assert np.array_equal(result[17600:], before[17600:40000])
    said = " ".join(proc.stdout.split())
    assert "2 inputs are cut short, holding less than their headers promise (cut.wav: 2.500 s of the 4.000 s" in said
    # One whose header was never finished is read to its end, and comes back with a header that says so.
    unfinished = report.loc["good-unfinished"]
    assert unfinished["checks"] == (
        "the input's header was never finished (it says it holds no samples; the 4.000 s that follow it were read)"
    )
    result, _ = sf.read(unfinished["output"], dtype="int16")
    assert len(result) == len(before) and np.array_equal(result[:16000], before[:16000])
    assert np.array_equal(result[17600:], before[17600:])
    assert "Input unfinished.wav was never finished: its header says it holds no samples" in said
    sent = [
        json.loads(x)["row"]
        for x in (tmp_path / "runs" / "bad" / "journal.jsonl").read_text().splitlines()
        if json.loads(x)["event"] == "sending"
    ]
    # nothing else was sent
    assert sorted(sent) == sorted(good)


@pytest.mark.parametrize("output_format", ["wav", "same"])  # same: the name waits for the input's format
def test_rows_that_would_overwrite_each_other_are_invalid_before_anything_is_made(tmp_path, output_format):
    # A name without {row_id} or {seed}: variations of one row, or rows of two recordings,
    # would each write the same file, the last one replacing the others. The first in the
    # manifest keeps the name; the others are invalid, saying why. Rows asking for the very
    # same edit may share it (it is made once), and so may regions of one recording that do
    # not overlap: that file holds all their edits (test_cli_run has the whole story).
    from soundpatch.batch import Batch
    from soundpatch.config import load_config
    from soundpatch.manifest import load_manifest

    rate = 16000
    sf.write(tmp_path / "good.wav", 0.2 * np.sin(2 * np.pi * 220 * np.arange(4 * rate) / rate), rate)
    sf.write(tmp_path / "other.wav", 0.2 * np.sin(2 * np.pi * 330 * np.arange(4 * rate) / rate), rate)
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt,seed,variations,output\n"
        "one,good.wav,1,1.5,door,5,1,takes/door\n"
        "two,./good.wav,2,2.5,door,5,1,takes/door\n"  # another region of it: both go into one file
        "same,good.wav,1,1.5,door,5,1,takes/door\n"  # the very same edit as one
        "near,good.wav,1.4,1.8,door,5,1,takes/door\n"  # overlaps one's region
        "elsewhere,other.wav,0,0.5,door,5,1,takes/door\n"  # another recording
        "many,good.wav,1,1.5,wind,,3,takes/wind\n"  # three variations, one name
        "own,good.wav,1,1.5,wind,,2,takes/wind-{seed}\n"  # each variation its own
    )
    cfg = load_config(
        overrides={
            "output.uri": str(tmp_path / "out"),
            "output.format": output_format,
            "runs_dir": str(tmp_path / "runs"),
        }
    )
    batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, "names")
    try:
        estimate = batch.estimate(batch.manifest.edits)
        outcomes = {o.row_id: o for o in map(batch.process, batch.manifest.edits)}
        batch.combine(list(outcomes.values()))
    finally:
        batch.close()
    assert [e[0] for e in estimate["errors"]] == ["near", "elsewhere", "many-v2", "many-v3"]
    statuses = {row: o.status for row, o in outcomes.items()}
    assert statuses == {
        "one": "succeeded",
        "two": "succeeded",
        "same": "skipped_done",
        "near": "invalid",
        "elsewhere": "invalid",
        "many-v1": "succeeded",
        "many-v2": "invalid",
        "many-v3": "invalid",
        "own-v1": "succeeded",
        "own-v2": "succeeded",
    }, statuses
    assert outcomes["elsewhere"].error == (
        "Its output name takes/door.wav is also the name of row one's result (line 2), which it would "
        "replace; give each row its own name (with {row_id} or {seed} in output), or name one file for "
        "regions of one recording that do not overlap."
    )
    assert "row one's result" in outcomes["near"].error and outcomes["near"].cost_usd == 0
    assert "row many-v1's result" in outcomes["many-v3"].error and outcomes["many-v2"].cost_usd == 0
    door = str(tmp_path / "out" / "takes" / "door.wav")
    assert {row: o.combined for row, o in outcomes.items() if o.combined} == {"one": door, "two": door, "same": door}
    seeds = [outcomes[f"own-v{k}"].seed for k in (1, 2)]
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.wav"))
    assert written == sorted(
        ["takes/door.wav", "takes/wind.wav", *(f"takes/wind-{seed}.wav" for seed in seeds)]
        + [f"takes/door.rows/{row}.wav" for row in ("one", "two", "same")]
    )


@pytest.mark.parametrize("blind", [False, True], ids=["case-sensitive disk", "case-blind disk"])
def test_names_differing_only_in_case_clash_on_a_disk_blind_to_case(tmp_path, monkeypatch, blind):
    # Take1.wav and take1.wav are two files on Linux and in a bucket, one on macOS's and
    # Windows' usual disks: there the second result would replace the first, paid for and
    # lost (and a rerun, finding the first's result gone, would pay for it again). Whether
    # the disk tells case apart is asked of the disk itself; this one does, and a case-blind
    # one is stood in for by saying so (no such file system can be mounted here).
    from soundpatch import storage
    from soundpatch.batch import Batch
    from soundpatch.manifest import load_manifest

    assert storage.blind_to_case(tmp_path / "not-made" / "yet") is False  # this disk: ext4
    assert list(tmp_path.iterdir()) == []  # the file it asked with is gone
    rate = 16000
    for name, hz in (("Take1.wav", 220), ("take1.wav", 330)):
        sf.write(tmp_path / name, 0.2 * np.sin(2 * np.pi * hz * np.arange(2 * rate) / rate), rate)
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt,seed,output\n"
        "upper,Take1.wav,0.5,1,door,5,{stem}\n"
        "lower,take1.wav,0.5,1,door,5,{stem}\n"
        "again,Take1.wav,1.2,1.5,door,5,{stem}\n"  # another region of the first: one file with it
    )
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")})
    monkeypatch.setattr(storage, "blind_to_case", lambda folder: blind)  # what the output folder's disk says
    batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, "case")
    try:
        outcomes = {o.row_id: o for o in map(batch.process, batch.manifest.edits)}
        batch.combine(list(outcomes.values()))
    finally:
        batch.close()
    statuses = {row: o.status for row, o in outcomes.items()}
    if not blind:
        assert statuses == {"upper": "succeeded", "lower": "succeeded", "again": "succeeded"}, statuses
        return
    assert statuses == {"upper": "succeeded", "lower": "invalid", "again": "succeeded"}, statuses
    assert outcomes["lower"].cost_usd == 0
    assert outcomes["lower"].error == (
        "Its output name take1.wav is also the name of row upper's result (line 2), Take1.wav on a disk that "
        "does not tell upper from lower case, which it would replace; give each row its own name (with "
        "{row_id} or {seed} in output), or name one file for regions of one recording that do not overlap."
    )
    assert outcomes["upper"].combined == outcomes["again"].combined == str(tmp_path / "out" / "Take1.wav")


def test_an_output_template_names_results_by_the_row_s_own_columns_prompt_and_region(tmp_path):
    # A dataset sorted by a column of the manifest, named by what was asked for: the
    # prompt as words (nothing in it makes a folder or climbs out), the region, the seed.
    rate = 16000
    sf.write(tmp_path / "door.wav", 0.2 * np.sin(2 * np.pi * 220 * np.arange(4 * rate) / rate), rate)
    (tmp_path / "m.yaml").write_text(
        "defaults: {input: door.wav, region: '1-1.5', seed: 7}\n"
        "rows:\n"
        "  - {id: a, prompt: 'Distant thunder, rolling \u2014 low', category: weather,"
        "     output: '{category}/{stem}-{prompt}-{seed}'}\n"
        "  - {id: b, prompt: '../../etc/passwd', category: foley, output: '{category}/{prompt}-{start}-{end}'}\n"
        "  - {id: c, prompt: '\u65e5\u672c\u306e \u592a\u9f13', category: drums, output: '{category}/{prompt}'}\n"
        "  - {id: d, prompt: wind, output: '{category}/{stem}'}\n"  # no such column on this row
        f"  - {{id: e, prompt: '{'long ' * 30}', output: 'long/{{prompt}}'}}\n"
        "  - {id: f, prompt: gong, variations: 2, seed: 40, output: 'takes/{prompt}-{variation}'}\n"
        "  - {id: g, prompt: gong, status: final, output: '{status}/{prompt}'}\n"  # named as a report column
        # The manifest's own columns by name: a matrix sweeping the model's settings.
        "  - {id: h, prompt: gong, steps: 6, guidance_scale: 7.5, output: 'sweep/{id}-{steps}-{guidance_scale}'}\n"
        "  - {id: i, prompt: gong, output: 'sweep/{id}-{steps}'}\n"  # left to the model: empty
    )
    [a, b, c, d, e, f1, f2, g, h, i], _, _ = run_in_process(
        tmp_path / "m.yaml",
        load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")}),
        "names",
    )
    assert [o.status for o in (a, b, c, e)] == ["succeeded"] * 4
    out = tmp_path / "out"
    assert a.output == str(out / "weather" / "door-distant-thunder-rolling-low-7.wav")
    assert b.output == str(out / "foley" / "etc-passwd-1-1.5.wav")
    assert c.output == str(out / "drums" / "\u65e5\u672c\u306e-\u592a\u9f13.wav")
    assert e.output == str(out / "long" / ("long-" * 12).rstrip("-")) + ".wav"  # 60 characters of it
    assert (f1.output, f1.seed, f2.output, f2.seed) == (
        str(out / "takes/gong-1.wav"),
        40,
        str(out / "takes/gong-2.wav"),
        41,
    )
    assert g.output == str(out / "final" / "gong.wav") and g.extra["manifest_status"] == "final"
    assert (h.output, i.output) == (str(out / "sweep" / "h-6-7.5.wav"), str(out / "sweep" / "i-.wav"))
    assert d.status == "invalid" and d.cost_usd == 0
    assert "names {category}, which is not a column of this row" in d.error


def test_an_output_name_ending_in_a_container_s_extension_is_written_in_that_container(tmp_path):
    # `takes/{stem}-{seed}.mp3`: the user asked for MP3s, whatever output.format says (they
    # were WAVs named take.mp3.wav). An extension soundpatch does not write is left to it.
    rate = 48000
    tone = 0.2 * np.sin(2 * np.pi * 220 * np.arange(3 * rate) / rate)
    sf.write(tmp_path / "door.wav", tone, rate, subtype="PCM_16")
    sf.write(tmp_path / "surround.wav", np.stack([tone] * 3, 1), rate, subtype="PCM_16")
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt,output\n"
        "a,door.wav,1,1.5,x,takes/{stem}-{id}.mp3\n"
        "b,door.wav,1,1.5,y,takes/{stem}-{id}.OGG\n"
        "c,door.wav,1,1.5,z,takes/b-side.flac\n"
        "d,door.wav,1,1.5,w,takes/{stem}-{id}.m4a\n"  # not one it writes: output.format's
        "e,surround.wav,1,1.5,v,takes/{stem}.mp3\n"  # MP3 holds two channels at most
    )
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")})
    a, b, c, d, e = run_in_process(tmp_path / "m.csv", cfg, "named")[0]
    takes = tmp_path / "out" / "takes"
    assert [o.output for o in (a, b, c, d)] == [
        str(takes / name) for name in ("door-a.mp3", "door-b.OGG", "b-side.flac", "door-d.m4a.wav")
    ]
    assert [sf.info(o.output).format for o in (a, b, c, d)] == ["MP3", "OGG", "FLAC", "WAV"]
    before = sf.read(tmp_path / "door.wav", dtype="int16")[0]
    outside = np.r_[0:rate, int(1.5 * rate) + 2400 : 3 * rate]  # (past the crossfade)
    assert np.array_equal(sf.read(c.output, dtype="int16")[0][outside], before[outside])  # lossless: to the bit
    assert e.status == "invalid" and e.cost_usd == 0
    assert "The output format MP3 cannot hold this recording (3 channels" in e.error
    assert "end the row's output name in another container's extension" in e.error


def test_a_fault_while_combining_a_recording_s_file_costs_that_file_not_the_run(tmp_path, monkeypatch):
    # The rows are done (and, with a hosted model, paid for) when their file is combined:
    # a fault there must leave their outcomes and the report standing, and say what failed.
    import soundpatch.combine
    from soundpatch.config import load_config

    rate = 16000
    sf.write(tmp_path / "good.wav", 0.2 * np.sin(2 * np.pi * 220 * np.arange(4 * rate) / rate), rate)
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt,output\none,good.wav,1,1.5,x,fixed\ntwo,good.wav,2,2.5,x,fixed\n"
    )

    def broken(*_args):
        raise ValueError("a bug")

    monkeypatch.setattr(soundpatch.combine, "overlay", broken)
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")})
    outcomes, notes, _ = run_in_process(tmp_path / "m.csv", cfg, "fault")
    assert [(o.status, o.combined) for o in outcomes] == [("succeeded", ""), ("succeeded", "")]
    assert (
        f"fixed.wav was not made. Unexpected ValueError (details in {tmp_path / 'runs' / 'fault' / 'errors.log'})."
        in notes
    )
    assert "ValueError: a bug" in (tmp_path / "runs" / "fault" / "errors.log").read_text()
    assert not (tmp_path / "out" / "fixed.wav").exists() and (tmp_path / "out" / "fixed.rows" / "one.wav").exists()


def test_a_reason_that_begins_with_a_file_or_a_url_keeps_its_name_as_it_was_given():
    # A row's reason is made a sentence with a capital: "Http://host/clip.wav is 0.08 MB, over
    # ..." named a URL that is not the row's (paths and keys are case-sensitive too).
    from soundpatch.errors import as_sentence

    assert (
        as_sentence("http://host/clip.wav is 0.08 MB, over the limit")
        == "http://host/clip.wav is 0.08 MB, over the limit."
    )
    assert as_sentence("s3://bucket/take.wav holds no audio samples") == "s3://bucket/take.wav holds no audio samples."
    assert as_sentence("take_2.wav is empty (0 bytes).") == "take_2.wav is empty (0 bytes)."
    assert as_sentence("audio/take.wav could not be written") == "audio/take.wav could not be written."
    assert as_sentence("region end 2 s is not after its start 3 s") == "Region end 2 s is not after its start 3 s."
    assert as_sentence("  ") == "Unknown error."
