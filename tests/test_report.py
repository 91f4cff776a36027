"""The report people open: quality checks that catch a broken splice, the HTML in a real
browser (Debian's chromium, headless), and the Prefect artifacts on a real Prefect server."""

from __future__ import annotations

import csv
import html
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from PIL import Image

from soundpatch import audio as A
from soundpatch import demo_audio
from soundpatch.batch import Batch
from soundpatch.config import load_config
from soundpatch.manifest import load_manifest
from soundpatch.outcome import Outcome
from soundpatch.providers.base import InpaintRequest
from soundpatch.providers.local import LocalEngine
from soundpatch.quality import measure
from soundpatch.report import summarize, write_reports
from tests.jobs import clean_env, run_in_process, seeded_prefect_home

RATE = 44100


def music() -> A.Audio:
    x = demo_audio.music(6.0, RATE, channels=2, seed=1)
    like = A.Audio(np.zeros((1, 2), np.int16), RATE, "WAV", "PCM_16")
    return A.Audio(A.from_float(x, like), RATE, "WAV", "PCM_16")


# ---------------------------------------------------------------------- card pictures


def test_a_card_picture_shades_the_region_and_shows_what_changed_in_it():
    """Before a 440 Hz tone throughout, after silence in 1-2 s of 3 s."""
    import io

    from soundpatch import picture
    from soundpatch.preview import Preview

    rate = 16000
    before = (0.5 * np.sin(2 * np.pi * 440 * np.arange(3 * rate) / rate)).astype(np.float32)
    after = before.copy()
    after[rate : 2 * rate] = 0
    png = picture.draw(Preview(before, after, rate, (1.0, 2.0), 0.0))
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    width, wave, spec = picture.WIDTH, picture.WAVE_HEIGHT, picture.SPEC_HEIGHT
    assert image.shape == (wave + 4 + spec, 2 * width + 12, 3)
    left, right = image[:, :width], image[:, width + 12 :]
    region, outside = slice(width // 3 + 5, 2 * width // 3 - 5), slice(10, width // 3 - 5)
    shaded = np.array([0xFD, 0xED, 0xBF])
    assert (right[wave // 2 - 3, region] == shaded).all()  # the silent region: shade, no ink
    assert not (left[wave // 2 - 3, region] == shaded).all(axis=-1).any()  # the tone's ink covers it
    assert (left[wave // 2, outside] == [0x1F, 0x5E, 0xA8]).all()  # before's ink is blue
    assert (right[wave // 2, outside] == [0x17, 0x69, 0x2B]).all()  # after's green
    spectrogram = slice(wave + 4, None)
    brightness = right[spectrogram].sum(axis=-1)
    assert brightness[:, region].mean() < brightness[:, outside].mean() / 4  # silence reads dark
    np.testing.assert_array_equal(left[spectrogram, outside], right[spectrogram, outside])


def test_a_run_makes_listening_copies_only_for_the_cards_its_report_can_show():
    from soundpatch.preview import Quota

    quota = Quota(keep=3)
    assert [quota.take(flagged=False) for _ in range(5)] == [True, True, True, False, False]
    # Flagged results come first in the report: the first three still get theirs.
    assert [quota.take(flagged=True) for _ in range(5)] == [True, True, True, False, False]
    assert quota.kept == 6

    everything_flagged = Quota(keep=3)  # a batch whose every result came back flagged
    assert sum(everything_flagged.take(flagged=True) for _ in range(400)) == 3
    assert not everything_flagged.take(flagged=False)


# ---------------------------------------------------------------------- quality checks


def test_a_good_splice_passes_every_check():
    original = music()
    a, b = 2 * RATE, int(2.3 * RATE)
    fill = LocalEngine().inpaint(InpaintRequest(original, a, b, "x", 1))
    published = A.decode(A.encode(A.splice(original, fill.fill, a, b, 0), "WAV"))
    q = measure(original, published, a, b, lossless=True)
    assert q.checks == "ok", q
    assert q.outside_max_diff == 0 and q.clipped == 0
    assert q.seam_in < 2 and q.seam_out < 2 and abs(q.loudness_delta_db) < 6


def test_a_deliberately_broken_splice_is_flagged():
    original = music()
    a, b = 2 * RATE, int(2.3 * RATE)
    shift = int(0.03 * RATE)  # the fill is taken 30 ms late and butted in without a crossfade
    broken = A.splice(original, A.to_float(original.samples[a + shift : b + shift]), a, b, 0)
    q = measure(original, broken, a, b, lossless=True)
    assert "discontinuity at the region's" in q.checks, q

    silence = A.splice(original, np.zeros((b - a, 2), np.float32), a, b, 0)
    assert "dB quieter than the audio either side of it" in measure(original, silence, a, b, lossless=True).checks

    loud = A.splice(original, np.ones((b - a, 2), np.float32), a, b, 0)
    assert "clipped samples in the region" in measure(original, loud, a, b, lossless=True).checks

    touched = A.Audio(original.samples.copy(), RATE, "WAV", "PCM_16")
    touched.samples[100] += 1  # one sample, one LSB, far from the region
    q = measure(original, touched, a, b, lossless=True)
    assert "audio outside the region changed" in q.checks and q.outside_max_diff > 0
    assert measure(original, touched, a, b, lossless=False).checks == "ok"  # lossy formats differ anyway


def test_an_earlier_result_written_in_a_format_that_cannot_hold_its_input_is_checked_as_written(tmp_path):
    # A 32-bit float WAV with peaks over full scale, done once into a WAV, then asked for as
    # FLAC (24-bit): the earlier result is written again, and FLAC clips its peaks. Its row
    # said "ok" (the checks of the WAV), over a file that lost half of full scale outside
    # the region. And the run and the dry run now say beforehand what FLAC does to it.
    t = np.arange(3 * 8000) / 8000
    hot = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[:, None]
    hot[4000:4100] *= 5  # 1.5 at most: a float WAV holds it
    sf.write(tmp_path / "hot.wav", hot, 8000, subtype="FLOAT")
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt\nx,hot.wav,2.0,2.2,fill\n")

    def run(fmt: str, run_id: str) -> tuple[Outcome, list[str]]:
        cfg = load_config(
            overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs"), "output.format": fmt}
        )
        outcomes, notes, _ = run_in_process(tmp_path / "m.csv", cfg, run_id)
        return outcomes[0], notes

    wav, notes = run("wav", "one")
    assert wav.status == "succeeded" and wav.checks == "ok" and not any("cannot be held" in n for n in notes)
    flac, notes = run("flac", "two")
    assert flac.status == "skipped_done" and flac.output.endswith(".flac")
    assert flac.outside_max_diff == pytest.approx(0.5, abs=1e-3)
    assert "audio outside the region changed (max 0.5)" in flac.checks
    assert np.abs(sf.read(flac.output)[0]).max() <= 1.0
    assert (
        f"1 input cannot be held in FLAC as it is: {tmp_path / 'hot.wav'} (32-bit float: rounded to 24 bits, "
        "and anything over full scale clipped). Outside the regions its results will not be the input's bit "
        "for bit, and its rows are flagged so; output.format: wav keeps it as it is."
    ) in notes


def test_a_noisy_fill_meeting_a_smooth_ring_is_a_change_of_texture_not_a_click():
    # An impact's ring (a low, pure tone) with its first 0.6 s replaced by something grainy,
    # as a prompt may well ask for: no step at either edge, so no discontinuity. The same
    # ring with its region lifted by a step is one.
    t = np.arange(3 * RATE) / RATE
    ring = np.round(9830 * np.exp(-t) * np.sin(2 * np.pi * 110 * t)).astype(np.int16)[:, None]
    original = A.Audio(ring, RATE, "WAV", "PCM_16")
    a, b = RATE, int(1.6 * RATE)
    grain = np.random.default_rng(7).normal(0, 0.03, (b - a, 1)).astype(np.float32)
    grain += A.to_float(original.samples[a:b])  # the ring goes on under it: it meets both edges
    q = measure(original, A.splice(original, grain, a, b, 0), a, b, lossless=True)
    assert "discontinuity" not in q.checks, q
    step = A.to_float(original.samples[a:b]) + 0.1
    q = measure(original, A.splice(original, step, a, b, 0), a, b, lossless=True)
    assert "discontinuity at the region's start" in q.checks and "discontinuity at the region's end" in q.checks, q


def test_a_fill_as_loud_as_the_audio_beside_it_is_not_flagged_where_a_sound_decays_around_it():
    # A hit at 0.5 s ringing away fast (30 dB a second), a region 1.2 s later: the second of
    # context before the region holds the ring's loud start, and against the two seconds
    # pooled the region read -18.8 dB. A fill as loud as the audio beside it (here the
    # original itself: the best fill there is) is fine; the same region silenced, or 20 dB
    # too loud, is not.
    t = np.arange(3 * RATE) / RATE
    rng = np.random.default_rng(3)
    ring = np.where(t >= 0.5, np.exp(-(t - 0.5) * 3.45), 0.0) * (0.6 * np.sin(2 * np.pi * 220 * t))
    ring += 0.002 * rng.standard_normal(len(t))  # a noise floor, so no side is digital silence
    original = A.Audio(np.round(ring * 32767).astype(np.int16)[:, None], RATE, "WAV", "PCM_16")
    a, b = int(1.7 * RATE), int(1.8 * RATE)
    same = A.to_float(original.samples[a:b])
    q = measure(original, A.splice(original, same, a, b, 0), a, b, lossless=True)
    assert q.checks == "ok" and abs(q.loudness_delta_db) < 1, q

    silence = A.splice(original, np.zeros((b - a, 1), np.float32), a, b, 0)
    q = measure(original, silence, a, b, lossless=True)
    assert "dB quieter than the audio either side of it" in q.checks and q.loudness_delta_db < -12, q
    loud = A.splice(original, same * 10, a, b, 0)
    q = measure(original, loud, a, b, lossless=True)
    assert q.loudness_delta_db > 12 and "dB louder than the audio either side of it" in q.checks, q


# ---------------------------------------------------------------------- the HTML in a browser


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed: .ci/run installs Debian's chromium for this test")
    pytest.skip("chromium is not installed (apt-get install chromium)")


def browse(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """Open a page headless as a person's browser would (file://, scripts on); the DOM after
    its scripts ran is on stdout, console messages on stderr."""
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--virtual-time-budget=5000",
            *extra,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def run_example(tmp_path: Path) -> Path:
    audio = tmp_path / "audio"
    audio.mkdir()
    original = music()
    (audio / "music.wav").write_bytes(A.encode(original, "WAV"))
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt,take\n"
        "gap,audio/music.wav,2.0,2.05,fill the gap,1\n"
        "click,audio/music.wav,3.1,3.102,remove the click,2\n"
        "late,audio/music.wav,4.0,9.0,past the end,3\n"
        "<script>alert(1)</script>,audio/music.wav,1.0,1.1,</script><b>not bold</b>,4\n"
    )
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")})
    batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, "html")
    outcomes = [batch.process(e) for e in batch.manifest.edits]
    batch.close()
    summary = summarize(outcomes, {"run_id": "html", "budget_usd": 10, "provider": "local", "wall_seconds": 1.0})
    return write_reports(batch.run_dir, outcomes, summary)["html"]


def test_the_html_report_in_a_real_browser(tmp_path):
    report = run_example(tmp_path)
    text = report.read_text()
    assert "<script>alert(1)</script>" not in text.split('id="report-data">')[1].split("</script>")[0]

    shown = browse(report, tmp_path, "--dump-dom")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert console_errors(shown.stderr) == [], console_errors(shown.stderr)
    dom = shown.stdout
    assert 'data-ready="true"' in dom  # the page's script ran to its end
    assert dom.count('class="card"') == 4
    assert "4 results · page 1 of 1" in dom
    assert "succeeded" in dom and "invalid" in dom and "spent" in dom and "provider reported" in dom
    assert dom.count("<img") == 3 and dom.count("<audio") == 6  # media for each published result
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and "<b>not bold</b>" not in dom
    # How each result was made, as report.csv has it (the local engine's method, here).
    methods = [r["method"] for r in csv.DictReader((report.parent / "report.csv").open()) if r["method"]]
    assert len(methods) == 3 and dom.count("<dt>method</dt>") == 3
    assert all(f"<dd>{html.escape(m, quote=False)}</dd>" in dom for m in methods)

    shot = tmp_path / "shot.png"
    taken = browse(report, tmp_path, "--screenshot=" + str(shot), "--window-size=1200,1600", "--hide-scrollbars")
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")) / 255
    assert pixels.std() > 0.05  # text, tiles and pictures, not a blank page
    assert (pixels < 0.5).mean() > 0.01  # some dark ink


def test_the_browser_check_does_see_console_errors(tmp_path):
    """The harness itself: a page that throws is caught, so a clean report means something."""
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><html><body><script>undefinedFunction();</script></body></html>")
    assert console_errors(browse(page, tmp_path, "--dump-dom").stderr)


def test_report_csv_keeps_seeds_whole_when_an_invalid_row_has_none(tmp_path):
    # With a row that never got a seed (its own was not a number), pandas made the column
    # floats: report.csv said "896505003.0", which a script passing it back as a seed refuses.
    made = Outcome(
        row_id="ok", input="a.wav", start=1.0, end=1.5, prompt="x", seed=896505003, provider="local", status="succeeded"
    )
    bad = Outcome(
        row_id="bad", input="a.wav", start=1.0, end=1.5, prompt="x", seed=None, provider="local", status="invalid"
    )
    summary = summarize([made, bad], {"run_id": "seeds", "budget_usd": 1})
    report = write_reports(tmp_path / "runs" / "seeds", [made, bad], summary)["csv"]
    rows = list(csv.DictReader(report.open()))
    assert [(r["row_id"], r["seed"], r["start"], r["attempts"]) for r in rows] == [
        ("ok", "896505003", "1.0", "0"),
        ("bad", "", "1.0", "0"),
    ]


def test_failures_that_differ_only_in_their_prediction_s_id_are_one_reason():
    # 300 predictions the model could not process were 300 reasons, one row each: the
    # summary showed eight and the report ten, each naming one prediction.
    from soundpatch.outcome import by_reason

    def failed(row: str, prediction: str, why: str = "the model could not process this input") -> Outcome:
        error = f"Each Labs reports prediction {prediction} failed: {why}."
        return Outcome(
            row_id=row, input="a.wav", start=1.0, end=1.5, prompt="x", seed=1, provider="eachlabs",
            status="failed", prediction_id=prediction, error=error,
        )  # fmt: skip

    outcomes = [failed(f"r{i}", f"{i:032x}") for i in range(5)]
    outcomes.append(failed("odd", "f" * 32, why="the input is silent"))
    assert by_reason(outcomes) == [
        ("failed", "Each Labs reports prediction <id> failed: the model could not process this input.",
         ["r0", "r1", "r2", "r3", "r4"]),
        ("failed", f"Each Labs reports prediction {'f' * 32} failed: the input is silent.", ["odd"]),
    ]  # fmt: skip


def test_a_10000_result_report_opens_without_freezing(tmp_path):
    outcomes = [
        Outcome(
            row_id=f"row{i:05d}",
            input=f"archive/take{i % 50}.wav",
            start=1.0,
            end=1.5,
            prompt=f"variation {i}",
            seed=i,
            provider="eachlabs",
            status=("succeeded", "failed", "skipped_done")[i % 3],
            cost_usd=0.2 if i % 3 == 0 else 0.0,
            output=f"s3://results/run/take-{i}.wav",
            error="The provider answered 500 three times." if i % 3 == 1 else "",
            checks="ok" if i % 7 else "discontinuity at the region's start (5x its surroundings)",
        )
        for i in range(10_000)
    ]
    summary = summarize(outcomes, {"run_id": "big", "budget_usd": 1000, "provider": "eachlabs", "wall_seconds": 9})
    run_dir = tmp_path / "runs" / "big"
    report = write_reports(run_dir, outcomes, summary)["html"]
    assert report.stat().st_size < 10_000_000

    # On top, why results did not succeed: one line for the 3,333 that failed the same way.
    reasons = report.read_text().split('<table class="reasons">')[1].split("</table>")[0]
    assert reasons.count("<tr>") == 1
    assert '<td class="count">3333</td>' in reasons and "The provider answered 500 three times." in reasons
    # ... and which they are, the first few (the Find box finds each one's card).
    assert 'three times. <span class="rows">(row00001, row00004, row00007 and 3330 more rows)</span>' in reasons

    shown = browse(report, tmp_path, "--dump-dom")
    assert shown.returncode == 0 and console_errors(shown.stderr) == [], shown.stderr[-2000:]
    assert "10000 results · page 1 of 200" in shown.stdout
    assert shown.stdout.count('class="card"') == 50  # one page is built, not ten thousand cards


# ---------------------------------------------------------------------- Prefect artifacts


def test_the_prefect_ui_tells_the_same_story(tmp_path):
    """A real run on Prefect's temporary server; the artifacts are read back from its API."""
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "music.wav").write_bytes(A.encode(music(), "WAV"))
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt\n"
        + "".join(f"r{i},audio/music.wav,{1 + i * 0.5},{1.05 + i * 0.5},fill {i}\n" for i in range(6))
        + "bad,audio/missing.wav,1,2,x\n"
    )
    script = textwrap.dedent(
        f"""
        import json
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
        from flows.ephemeral import isolated_api
        from flows.inpaint_batch import inpaint_batch

        import flows.inpaint_batch
        from prefect.context import FlowRunContext

        def publish_reports(*args):  # every row has ended: how many result links does Prefect keep?
            print("result links", len(FlowRunContext.get().run_results))
            return reports(*args)

        reports, flows.inpaint_batch.publish_reports = flows.inpaint_batch.publish_reports, publish_reports
        config = {{"output": {{"uri": {str(tmp_path / "out")!r}}}, "runs_dir": {str(tmp_path / "runs")!r}}}
        with isolated_api():
            from prefect.settings import get_current_settings
            print("heartbeats every", get_current_settings().flows.heartbeat_frequency)
            state = inpaint_batch({str(tmp_path / "m.csv")!r}, config=config, run_id="ui", return_state=True)
            print("state", state.type.value, state.message)
            with get_client(sync_client=True) as client:
                flow_run_id = state.state_details.flow_run_id
                artifacts = client.read_artifacts(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
                )
                shown = [
                    {{"key": a.key, "type": a.type, "data": a.data, "description": a.description}} for a in artifacts
                ]
                print(json.dumps(shown))
        """
    )
    home = seeded_prefect_home(tmp_path / "prefect")
    env = clean_env(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The temporary server ends with the run: no heartbeats, whose thread held up its end.
    assert "heartbeats every None" in proc.stdout.splitlines()
    # Prefect's links from each row's result to its task run are dropped as results come in
    # (kept, they cost about 5 KB a row for the whole run): none is left at the end.
    assert "result links 0" in proc.stdout.splitlines()
    # A row is missing: the flow run says so (automations on a deployment can alert on it).
    (state,) = [line for line in proc.stdout.splitlines() if line.startswith("state ")]
    assert state.startswith("state FAILED 1 of 7 results are missing (1 invalid)"), state
    assert str(tmp_path / "runs" / "ui" / "report.html") in state
    artifacts = json.loads(proc.stdout.strip().splitlines()[-1])
    by_type = {a["type"]: a for a in artifacts}
    assert set(by_type) >= {"progress", "table", "markdown"}, artifacts
    assert float(by_type["progress"]["data"]) == 100.0
    # What the rows came to, beside the bar: not only how far along.
    said = by_type["progress"]["description"]
    assert said == "soundpatch run ui: 7/7 results ended, 1 failed or invalid, $0.00 of $10.00 spent", said

    table = by_type["table"]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert by_type["table"]["key"] == "soundpatch-outcomes"
    statuses = sorted(r["status"] for r in table)
    assert statuses == ["invalid"] + ["succeeded"] * 6

    markdown = by_type["markdown"]["data"]
    assert by_type["markdown"]["key"] == "soundpatch-summary"
    assert "| succeeded | 6 |" in markdown and "| invalid | 1 |" in markdown and "spent" in markdown
    [why] = [line for line in markdown.splitlines() if line.startswith("| 1 invalid | ")]
    assert "missing.wav" in why, markdown
    assert "run the flow again" not in markdown  # an invalid row is not tried again: its input is to mend
    report = pd.read_csv(tmp_path / "runs" / "ui" / "report.csv")
    assert (report["status"] == "succeeded").sum() == 6


def test_what_running_a_run_again_would_do_is_counted_and_said_in_its_prefect_summary():
    from flows.artifacts import summary_markdown
    from soundpatch.outcome import NOT_STARTED, to_finish

    def row(row_id: str, status: str, provider: str = "eachlabs", error: str = "") -> Outcome:
        return Outcome(row_id, "x.wav", 1.0, 2.0, "p", None, provider, status, error=error)

    rows = [
        row("a", "succeeded"),
        row("b", "failed", error="Each Labs reports prediction 1 failed"),
        row("c", "failed", error=NOT_STARTED + "the run was interrupted"),  # resuming is said apart
        row("d", "invalid", error="Start '-1' is negative."),
        row("e", "skipped_budget"),
        row("f", "skipped_budget", provider="fal"),
        row("g", "skipped_budget", provider="local"),  # at $0
    ]
    prices = {"eachlabs": 0.2, "fal": 0.25, "local": 0.0}
    finish = to_finish(rows, 0.4, prices.__getitem__)
    assert (finish.failed, finish.stopped, round(finish.more_usd, 9), finish.budget_usd) == (1, 3, 0.45, 0.85)
    assert to_finish(rows, 0.401, prices.__getitem__).budget_usd == 0.86  # in cents, up: never short
    assert to_finish(rows[:4], 0.4, prices.__getitem__) == to_finish([row("b", "failed")], 0.4, prices.__getitem__)
    nothing = to_finish([row("a", "succeeded"), row("g", "skipped_budget", provider="local")], 0.0, prices.get)
    assert (nothing.failed, nothing.stopped) == (0, 0)

    summary = {"run_id": "night4", "spent_usd": 0.4, "budget_usd": 0.5, "by_status": {}}
    markdown = summary_markdown(summary, "runs/night4/report.html", (), finish)
    assert (
        "The flow run again with the parameter `run_id` set to `night4` tries the 1 failed result again, keeping "
        "what is done.\n\nThe 3 results the budget stopped would cost about $0.45 more: the flow run again with the "
        "parameter `run_id` set to `night4` and `overrides` holding `limits.budget_usd: 0.85` makes them, keeping "
        "what is done."
    ) in markdown
    assert "flow run again" not in summary_markdown(summary, "r.html", (), nothing)


def test_a_flow_run_whose_report_could_not_be_written_does_not_point_at_it():
    # Its disk was full (report.publish_reports noted it): the flow run's state named a
    # report.html that is not there.
    from flows.inpaint_batch import _what_went_wrong

    rows = [
        Outcome(row, "x.wav", 1.0, 2.0, "p", None, "local", status)
        for row, status in (("a", "succeeded"), ("b", "failed"))
    ]
    assert _what_went_wrong(rows, "runs/x/report.html") == (
        "1 of 2 results are missing (1 failed); the report is at runs/x/report.html"
    )
    assert _what_went_wrong(rows, None) == (
        "1 of 2 results are missing (1 failed); the report could not be written (the summary's notes say why)"
    )
