"""output.index: one CSV beside a dataset's results, a line each, grown run by run."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from soundpatch import dataset_index
from soundpatch.config import S3Config
from soundpatch.outcome import SUCCEEDED, Outcome
from soundpatch.s3 import S3
from soundpatch.storage import LocalFolder, S3Prefix
from tests.jobs import clean_env, soundpatch

MATRIX = """\
defaults:
  input: door.wav
  region: "0.5-0.8"
  category: foley
  output: "dataset/{category}/{prompt}-{seed}.{ext}"
matrix:
  prompt: [creak, slam]
  seed: SEEDS
"""


def night(tmp_path: Path, seeds: list[int], run_id: str, env: dict[str, str]) -> str:
    """A nightly run of the matrix at these seeds: what it printed (exit 0 asserted)."""
    (tmp_path / "m.yaml").write_text(MATRIX.replace("SEEDS", str(seeds)))
    proc = soundpatch("run", "m.yaml", "--config", "c.yaml", "--run-id", run_id, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return " ".join(proc.stdout.replace("│", " ").split())


def read_index(data: bytes) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False).set_index("file_name")


@pytest.mark.parametrize("where", ["folder", "bucket"])
def test_nightly_runs_grow_one_index_of_the_dataset_with_a_line_a_result(tmp_path, aws_env, where):
    sf.write(tmp_path / "door.wav", np.random.default_rng(3).normal(0, 0.1, (44100, 2)), 44100, subtype="PCM_16")
    uri = str(tmp_path / "out") if where == "folder" else f"s3://{aws_env.bucket('takes')}/lib"
    s3 = f"storage: {{s3: {{endpoint_url: '{aws_env.endpoint}'}}}}\n" if where == "bucket" else ""
    (tmp_path / "c.yaml").write_text(f"output: {{uri: '{uri}', index: dataset/metadata.csv}}\n{s3}")
    env = clean_env(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")

    def index() -> pd.DataFrame:
        if where == "folder":
            return read_index((tmp_path / "out" / "dataset" / "metadata.csv").read_bytes())
        return read_index(aws_env.client.get_object(Bucket="takes", Key="lib/dataset/metadata.csv")["Body"].read())

    def stored(name: str) -> bool:
        if where == "folder":
            return (tmp_path / "out" / "dataset" / name).is_file()
        return f"lib/dataset/{name}" in aws_env.keys("takes", "lib/dataset/")

    said = night(tmp_path, [1, 2], "n1", env)
    shown = (
        tmp_path / "out" / "dataset" / "metadata.csv" if where == "folder" else "s3://takes/lib/dataset/metadata.csv"
    )
    assert f"datasetindex{shown}" in said.replace(" ", "")  # (a long path wraps in its cell)
    report = (tmp_path / "runs" / "n1" / "report.html").read_text()
    assert f"<tr><th>dataset index</th><td>{shown}</td></tr>" in report  # and the report says where too
    first = index()
    assert sorted(first.index) == [f"foley/{p}-{s}.wav" for p in ("creak", "slam") for s in (1, 2)]
    assert all(stored(name) for name in first.index)  # named as the CSV's folder holds them
    columns = ["prompt", "seed", "category", "run_id", "input", "start", "end"]
    assert first.loc["foley/slam-2.wav", columns].tolist() == ["slam", "2", "foley", "n1", "door.wav", "0.5", "0.8"]

    said = night(tmp_path, [2, 3], "n2", env)  # seed 2 is reused at $0, seed 3 is new
    assert "skipped_done 2" in said and "was not updated" not in said
    second = index()
    assert len(second) == 6
    assert second.loc["foley/creak-3.wav", "run_id"] == "n2"
    assert second.loc["foley/creak-2.wav", "run_id"] == "n1"  # reused: its line as it was
    assert second.loc["foley/creak-1.wav"].tolist() == first.loc["foley/creak-1.wav"].tolist()  # not in this night
    if where == "bucket":
        return

    # A line lost (edited away by hand) is back the next time its row runs.
    path = tmp_path / "out" / "dataset" / "metadata.csv"
    path.write_text("".join(line for line in path.read_text().splitlines(True) if "slam-2" not in line))
    night(tmp_path, [2], "n3", env)
    assert len(index()) == 6 and index().loc["foley/slam-2.wav", "run_id"] == "n3"

    # A CSV that is not an index is left alone, and the run says so; its results are made all the same.
    path.write_text("name,score\na.wav,3\n")
    said = night(tmp_path, [4], "n4", env)
    assert path.read_text() == "name,score\na.wav,3\n"
    assert f"The dataset index {path} was not updated with this run's results: it has no file_name column" in said
    assert "rerunning with --run-id n4 adds them at no new cost" in said
    assert stored("foley/creak-4.wav")


@pytest.mark.parametrize("where", ["folder", "bucket"])
def test_runs_ending_at_once_lose_none_of_each_other_s_lines(tmp_path, aws_env, where):
    # Eight runs (threads here) add their results at once: each write is made only if the
    # index is still as that run read it, else it is read and merged again. Written
    # unconditionally, most of the lines were lost.
    if where == "folder":
        store = LocalFolder(tmp_path / "out")
    else:
        store = S3Prefix(S3(S3Config(endpoint_url=aws_env.endpoint), connections=16), "s3://index-race/ds/")
        aws_env.bucket("index-race")
    runs = [f"run{i}" for i in range(8)]

    def outcomes(run_id: str) -> list[Outcome]:
        return [
            Outcome(f"{run_id}-{k}", "a.wav", 1, 2, "rain", k, "local", SUCCEEDED, output=store.uri(f"{run_id}/{k}"))
            for k in range(5)
        ]

    start = threading.Barrier(len(runs))
    notes: list[str | None] = []

    def end_of_run(run_id: str) -> None:
        start.wait()
        notes.append(dataset_index.update(store, "metadata.csv", outcomes(run_id), run_id))

    threads = [threading.Thread(target=end_of_run, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert notes == [None] * len(runs)
    held = store.read_file("metadata.csv", 1 << 20)
    assert held is not None
    assert sorted(read_index(held[0]).index) == sorted(f"{r}/{k}" for r in runs for k in range(5))
