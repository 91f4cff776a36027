from __future__ import annotations

import re
from pathlib import Path

import pytest

from soundpatch.edits import parse_region, parse_time
from soundpatch.errors import ManifestError
from soundpatch.manifest import load_manifest


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("12.5", 12.5), ("0", 0.0), ("1:02.5", 62.5), ("01:02:03.25", 3723.25), ("2:00", 120.0), (7, 7.0)],
)
def test_times_accept_seconds_and_timecodes(text, seconds):
    assert parse_time(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["abc", "nan", "inf", "-1", "1:75", "", "1e12"])
def test_bad_times_are_refused_with_a_reason(text):
    with pytest.raises(ValueError):
        parse_time(text)


@pytest.mark.parametrize(
    ("text", "fps", "seconds"),
    [
        ("00:00:01:12", "25", 1 + 12 / 25),
        ("00:00:10:00", "24", 10.0),
        # NTSC counts 30 frames a second at 30000/1001 a second: an hour of counted
        # timecode is 3603.6 s; drop-frame skips frame numbers to keep to the clock.
        ("01:00:00:00", "29.97", 3603.6),
        ("00:10:00;00", "29.97", 17982 * 1001 / 30000),
        ("00:10:00:00", "29.97df", 17982 * 1001 / 30000),
        ("00:01:00;02", "29.97", 1800 * 1001 / 30000),
        ("00:00:10:00", "23.976", 10.01),
        ("00:01:00;04", "59.94", 3600 * 1001 / 60000),
    ],
)
def test_smpte_timecodes_count_frames_at_the_row_s_frame_rate(text, fps, seconds):
    assert parse_time(text, "start", fps) == pytest.approx(seconds, abs=1e-9)


@pytest.mark.parametrize(
    ("text", "fps", "message"),
    [
        ("00:00:01:12", None, "is a timecode with frames (hh:mm:ss:ff); give its frame rate in an fps column"),
        ("00:00:01:25", "25", "is not a valid timecode at 25 fps"),
        ("00:01:00;00", "29.97", "is a frame number drop-frame timecode skips"),
        ("00:00:01;00", "25", "drop-frame timecode, which only 29.97 and 59.94 fps use"),
        ("00:00:01:00", "25df", "fps '25df' is not a frame rate"),
        ("00:00:01:00", "PAL", "fps 'PAL' is not a frame rate"),
    ],
)
def test_smpte_timecodes_that_cannot_be_counted_say_why(text, fps, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_time(text, "start", fps)


def test_a_manifest_s_fps_column_reads_its_timecodes_and_leaves_other_rows_ids_alone(tmp_path):
    rows = "a.wav,00:00:01:12,00:00:02:00,rain,25\nb.wav,1.5,2,rain,\nc.wav,00:00:01:12,00:00:02:00,rain,\n"
    timed = load_manifest(write(tmp_path, "m.csv", "input,start,end,prompt,fps\n" + rows)).edits
    assert (timed[0].start, timed[0].end, timed[0].error) == (1.48, 2.0, None)
    assert "give its frame rate in an fps column" in timed[2].error
    plain = load_manifest(write(tmp_path, "p.csv", "input,start,end,prompt\nb.wav,1.5,2,rain\n")).edits
    assert timed[1].row_id == plain[0].row_id and "fps" not in timed[0].extra
    yaml = "defaults: {fps: 29.97df, prompt: hiss}\nrows:\n  - {input: a.wav, region: '00:09:59;28-00:10:00;00'}\n"
    [dropped] = load_manifest(write(tmp_path, "m.yaml", yaml)).edits
    assert (dropped.start, dropped.end) == pytest.approx((17980 * 1001 / 30000, 17982 * 1001 / 30000))


def test_region_strings():
    assert parse_region("12.5-15") == (12.5, 15.0)
    assert parse_region(" 0:12.5 - 0:15 ") == (12.5, 15.0)
    assert parse_region("1..2") == (1.0, 2.0)


def test_csv_rows_parse_with_unknown_columns_carried(tmp_path):
    m = load_manifest(
        write(
            tmp_path,
            "m.csv",
            (
                "input,start,end,prompt,seed,mood\n"
                "a.wav,1,2.5,rain on a tin roof,42,calm\n"
                "b.flac,0:01.5,0:02,thunder,,dark\n"
            ),
        )
    )
    a, b = m.edits
    assert (a.input, a.start, a.end, a.prompt, a.seed) == ("a.wav", 1.0, 2.5, "rain on a tin roof", 42)
    assert a.extra == {"mood": "calm"}
    assert (b.start, b.end) == (1.5, 2.0)
    assert b.seed is not None and 0 <= b.seed < 2**31  # derived, reproducible
    assert all(e.valid for e in m.edits)


def test_ids_and_derived_seeds_are_stable_across_reads(tmp_path):
    text = "input,start,end,prompt\na.wav,1,2,x\na.wav,1,2,y\n"
    first = load_manifest(write(tmp_path, "m.csv", text)).edits
    second = load_manifest(write(tmp_path, "n.csv", text)).edits
    assert [(e.row_id, e.seed) for e in first] == [(e.row_id, e.seed) for e in second]
    assert first[0].row_id != first[1].row_id


def test_yaml_defaults_merge_and_variations_expand(tmp_path):
    m = load_manifest(
        write(
            tmp_path,
            "m.yaml",
            """
defaults: {input: fx.wav, region: "1-1.5", variations: 2}
rows:
  - {id: door, prompt: door slam}
  - {id: glass, prompt: glass, variations: 3, seed: 10}
""",
        )
    )
    ids = [e.row_id for e in m.edits]
    assert ids == ["door-v1", "door-v2", "glass-v1", "glass-v2", "glass-v3"]
    assert [e.seed for e in m.edits[2:]] == [10, 11, 12]
    assert m.edits[0].seed != m.edits[1].seed
    assert all(e.input == "fx.wav" and (e.start, e.end) == (1.0, 1.5) for e in m.edits)


def test_yaml_matrix_expands_to_the_product(tmp_path):
    m = load_manifest(
        write(
            tmp_path,
            "m.yaml",
            """
defaults: {region: "0-1"}
matrix: {input: [a.wav, b.wav], prompt: [x, y, z], seed: [1, 2]}
""",
        )
    )
    assert len(m.edits) == 12
    assert len({e.row_id for e in m.edits}) == 12


def test_yaml_values_that_would_reach_the_provider_in_python_spelling_make_the_row_invalid_saying_why(tmp_path):
    # `prompt: [a, b]` went to the provider as the prompt "['a', 'b']", paid for; `prompt: no` as "False".
    m = load_manifest(
        write(
            tmp_path,
            "m.yaml",
            """
defaults: {input: fx.wav, region: "1-1.5"}
rows:
  - {id: two-prompts, prompt: [door slam, glass]}
  - {id: seeds, prompt: door, seed: [1, 2]}
  - {id: mapping, prompt: {text: door}}
  - {id: yes-no, prompt: no}
  - {id: fine, prompt: door, seed: 3}
""",
        )
    )
    reasons = {e.row_id: e.error for e in m.edits}
    assert reasons == {
        "two-prompts": "Prompt is a list (['door slam', 'glass']), not one value; a list under matrix: makes a row "
        "of each.",
        "seeds": "Seed is a list ([1, 2]), not one value; a list under matrix: makes a row of each.",
        "mapping": "Prompt is a mapping ({'text': 'door'}), not one value.",
        "yes-no": "Prompt reads as false in YAML (yes, no, on, off do); put it in quotes.",  # was sent as "False"
        "fine": None,
    }


BAD_ROWS = {
    "empty-input": (",1,2,x", "input is empty"),
    "end-before-start": ("a.wav,3,2,x", "not after its start"),
    "equal": ("a.wav,2,2,x", "not after its start"),
    "nan": ("a.wav,nan,2,x", "finite"),
    "negative": ("a.wav,-1,2,x", "negative"),
    "huge": ("a.wav,1,1e300,x", "longer than a week"),
    "text-start": ("a.wav,abc,2,x", "not a number of seconds"),
    "no-end": ("a.wav,1,,x", "end is missing"),
    "empty-prompt": ("a.wav,1,2,", "prompt is empty"),
    "long-prompt": ("a.wav,1,2," + "x" * 50_000, "limit is 2000"),
    "bad-scheme": ("ftp://h/a.wav,1,2,x", "ftp:// is not supported"),
    "bad-seed": ("a.wav,1,2,x,1.5", "seed"),
    "negative-seed": ("a.wav,1,2,x,-3", "outside"),
    "unknown-provider": ("a.wav,1,2,x,,nosuch", "provider 'nosuch' is unknown"),
    "too-many-fields": ("a.wav,1,2,x,1,local,extra", "fields but the header has"),
}


def test_each_bad_row_is_invalid_with_a_reason_and_the_rest_survive(tmp_path):
    lines = ["input,start,end,prompt,seed,provider", "good.wav,1,2,fine"]
    lines += [row for row, _ in BAD_ROWS.values()]
    m = load_manifest(write(tmp_path, "m.csv", "\n".join(lines) + "\n"))
    assert len(m.edits) == 1 + len(BAD_ROWS)
    assert m.edits[0].valid
    for edit, (name, (_, reason)) in zip(m.edits[1:], BAD_ROWS.items(), strict=True):
        assert not edit.valid, name
        assert reason.lower() in edit.error.lower(), (name, edit.error)
        assert edit.error.endswith(".") and "\n" not in edit.error


def test_duplicate_explicit_ids_make_the_second_row_invalid(tmp_path):
    m = load_manifest(write(tmp_path, "m.csv", "id,input,start,end,prompt\nx,a.wav,1,2,p\nx,b.wav,1,2,q\n"))
    assert m.edits[0].valid
    assert "already used" in m.edits[1].error
    assert m.edits[0].row_id != m.edits[1].row_id


def test_region_column_and_start_end_together_is_invalid(tmp_path):
    m = load_manifest(write(tmp_path, "m.csv", "input,start,end,region,prompt\na.wav,1,2,1-2,p\n"))
    assert "either region or start/end" in m.edits[0].error


def test_semicolon_csv_and_bom_are_read(tmp_path):
    m = load_manifest(write(tmp_path, "m.csv", "\ufeffinput;region;prompt\na.wav;1-2;p\n".encode()))
    assert m.edits[0].valid and m.edits[0].start == 1.0


def test_excel_unicode_text_is_read(tmp_path):
    # Excel's "Unicode Text" export: UTF-16 with its byte-order mark, tab-separated, CRLF.
    text = "input\tstart\tend\tprompt\r\nrue/café.wav\t1.5\t2\train on a café awning\r\n"
    for encoding in ("utf-16-le", "utf-16-be"):
        raw = ("\ufeff" + text).encode(encoding)
        [edit] = load_manifest(write(tmp_path, "m.txt", raw)).edits
        assert edit.error is None and edit.prompt == "rain on a café awning"
        assert edit.input.endswith("rue/café.wav") and (edit.start, edit.end) == (1.5, 2.0)


def test_semicolon_csv_reads_decimal_commas_as_a_spreadsheet_writes_them(tmp_path):
    text = (
        "input;start;end;prompt;guidance_scale;note\n"
        "a.wav;0,5;0:01,25;p;7,5;1,5 dB quieter\n"
        "a.wav;1.234,5;2;p;;\n"
        "b.wav;;;p;;\n"
    )
    m = load_manifest(write(tmp_path, "m.csv", text))
    first = m.edits[0]
    assert (first.start, first.end, first.guidance_scale) == (0.5, 1.25, 7.5)
    assert first.extra == {"note": "1,5 dB quieter"}  # a column soundpatch does not read is kept as written
    assert "Start '1.234,5' is not a number of seconds" in m.edits[1].error
    region = load_manifest(write(tmp_path, "r.csv", "input;region;prompt\na.wav;12,5-15,25;p\n")).edits[0]
    assert (region.start, region.end) == (12.5, 15.25)


def test_a_decimal_comma_elsewhere_is_refused_with_the_fix(tmp_path):
    m = load_manifest(write(tmp_path, "m.csv", 'input,start,end,prompt\na.wav,"0,5",1,p\n'))
    assert m.edits[0].error.endswith("(write decimals with a point, as in 0.5).")


def test_known_columns_are_read_in_any_case_as_spreadsheets_write_them(tmp_path):
    csv_rows = load_manifest(write(tmp_path, "m.csv", "ID,Input,Start,End,Prompt,Mood\nx,a.wav,1,2,p,calm\n")).edits
    assert [(e.row_id, e.input, e.start, e.end, e.prompt, e.extra) for e in csv_rows] == [
        ("x", "a.wav", 1.0, 2.0, "p", {"Mood": "calm"})
    ]
    yaml_rows = load_manifest(
        write(
            tmp_path,
            "m.yaml",
            "defaults: {Prompt: p, REGION: '1-2'}\n"
            "rows:\n  - {Input: a.wav, Seed: 5}\n  - {input: a.wav, Input: b.wav}\n",
        )
    ).edits
    assert (yaml_rows[0].input, yaml_rows[0].prompt, yaml_rows[0].start, yaml_rows[0].seed) == ("a.wav", "p", 1.0, 5)
    assert "names the column 'input' twice" in yaml_rows[1].error
    with pytest.raises(ManifestError, match="names the column 'input' twice"):
        load_manifest(write(tmp_path, "d.csv", "input,Input,start,end,prompt\na,b,1,2,p\n"))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.csv", None, "does not exist"),
        ("latin1.csv", "input,start,end,prompt\ncaf\xe9.wav,1,2,p\n".encode("latin-1"), "not UTF-8"),
        ("noinput.csv", "file,start,end,prompt\na,1,2,p\n", "no 'input'"),
        ("bad.yaml", "rows: [a, b\n", "not valid YAML"),
        ("empty.csv", "", "empty"),
        ("header-only.csv", "input,start,end,prompt\n", "has no rows"),
        ("m.txt.json", "{}", "must end in .csv"),
        ("top.yaml", "stuff: []\n", "unknown top-level key"),
    ],
)
def test_unreadable_manifests_raise_one_clear_sentence(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert message in str(info.value)
    assert str(info.value).endswith(".")


def test_a_manifest_a_spreadsheet_saved_in_windows_code_page_says_where_and_how_to_save_it(tmp_path):
    # Excel's "CSV (Comma delimited)" writes Windows-1252: autocorrect's em dash is byte 0x97.
    path = tmp_path / "m.csv"
    path.write_bytes("input,start,end,prompt\na.wav,1,2,rain\nb.wav,1,2,rain on a roof \u2014 far\n".encode("cp1252"))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    said = str(info.value)
    assert "byte 0x97 on line 3, after 'b.wav,1,2,rain on a roof'" in said
    assert "'\u2014' in Windows-1252" in said and '"CSV UTF-8"' in said
    path.write_bytes(b"\xef\xbb\xbfinput,start,end,prompt\na.wav,1,2,caf\xe9 noise\n")  # after Excel's mark
    with pytest.raises(ManifestError, match="byte 0xe9 on line 2, after 'a.wav,1,2,caf', which is '\u00e9'"):
        load_manifest(path)
    (tmp_path / "m.yaml").write_bytes(b"rows:\n  - {input: a.wav, region: 1-2, prompt: caf\xe9}\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "m.yaml")
    assert "line 2" in str(info.value) and "CSV" not in str(info.value)
    (tmp_path / "u.csv").write_bytes(b"\xff\xfei\x00n\x00p")  # UTF-16 cut mid-character
    with pytest.raises(ManifestError, match="UTF-16 text but is cut short"):
        load_manifest(tmp_path / "u.csv")


def test_columns_soundpatch_does_not_read_that_look_like_one_it_does_are_pointed_out(tmp_path):
    from soundpatch.manifest import lookalike_columns

    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt,sead,Start_s,guidance,note,kind,duration,take,Steps\n"
        "a,x.wav,1,2,p,4,1.0,7,hi,click,3,1,5\n"
    )
    manifest = load_manifest(tmp_path / "m.csv")
    assert manifest.edits[0].steps == 5  # a known column in another case is that column
    assert lookalike_columns(manifest.edits) == {"sead": "seed", "Start_s": "start", "guidance": "guidance_scale"}
