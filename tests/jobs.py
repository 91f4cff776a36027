"""Shared pieces for tests that run whole hosted jobs: a manifest, a config, the command."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from soundpatch.config import Config, load_config

KEY = "sk-crash-test"
SCRIPT = Path(sys.executable).parent / "soundpatch"


def synth(seconds: float, rate: int, channels: int, seed: int = 0) -> np.ndarray:
    """A steady test tone (two partials and a little noise), float32 (frames, channels)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    base = 0.15 * np.sin(2 * np.pi * 110 * t) + 0.08 * np.sin(2 * np.pi * 275 * t)
    return np.stack([base + 0.01 * rng.standard_normal(len(t)) for _ in range(channels)], 1).astype(np.float32)


def write_job(
    workdir: Path, sim, s3, rows: int, concurrency: int, rpm: float = 600, provider_name: str = "eachlabs", **provider
) -> None:
    lines = ["id,input,start,end,prompt,seed"]
    lines += [f"r{i:02d},fx.wav,1.0,1.5,take {i:02d},{i}" for i in range(rows)]
    (workdir / "job.csv").write_text("\n".join(lines) + "\n")
    extra = "".join(f", {k}: {json.dumps(v)}" for k, v in provider.items())
    (workdir / "job.yaml").write_text(
        f"provider: {{name: {provider_name}, base_url: '{sim.base_url}', poll_seconds: 0.2, max_poll_seconds: 0.5"
        f"{extra}}}\n"
        f"limits: {{concurrency: {concurrency}, budget_usd: 100, requests_per_minute: {rpm}}}\n"
        f"storage: {{s3: {{endpoint_url: '{s3.endpoint}'}}, staging: 's3://stage/clips/'}}\n"
    )


def run_in_process(manifest: Path | str, cfg: Config, run_id: str) -> tuple[list, list[str], Any]:
    """A run's rows in this process, in manifest order, then what the flow does after them
    (the files rows of one recording share); returns (outcomes, the run's notes, the batch).
    `manifest`: a file, or an s3:// or http(s):// one."""
    from soundpatch.batch import Batch
    from soundpatch.manifest_source import read_manifest

    batch = Batch(read_manifest(str(manifest), cfg.storage), cfg, run_id)
    try:
        outcomes = [batch.process(e) for e in batch.manifest.edits]
        batch.combine(outcomes)
        return outcomes, batch.notes(), batch
    finally:
        batch.close()


def hosted_config(sim, s3_endpoint: str, output: str, runs_dir: Path, **overrides: Any) -> Config:
    """A config for in-process hosted runs: Each Labs at `sim`, clips staged in s3://stage/clips/
    of the S3 server at `s3_endpoint`, quick polls; `overrides` win."""
    return load_config(
        overrides={
            "provider.name": "eachlabs",
            "provider.base_url": sim.base_url,
            "provider.poll_seconds": 0.05,
            "storage.s3.endpoint_url": s3_endpoint,
            "storage.staging": "s3://stage/clips/",
            "output.uri": output,
            "runs_dir": str(runs_dir),
            **overrides,
        }
    )


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without Prefect settings or a provider key of the developer's, plus `extra`."""
    keys = ("EACHLABS_API_KEY", "STABILITY_API_KEY", "FAL_KEY")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in keys}
    env.update(extra)
    return env


_PREFECT_DB: Path | None = None  # an empty Prefect database, made once a session


def seeded_prefect_home(home: Path) -> Path:
    """`home`, a new PREFECT_HOME, holding an empty Prefect database already made: a copy of
    one made once a session. Each new home's first run would otherwise make its own, ~10 s
    of migrations, in every test that runs Prefect in a home of its own (another machine's)."""
    global _PREFECT_DB
    if _PREFECT_DB is None:
        made = Path(tempfile.mkdtemp(prefix="soundpatch-tests-prefect-db-"))
        atexit.register(shutil.rmtree, made, True)
        command = [str(SCRIPT.parent / "prefect"), "server", "database", "upgrade", "-y"]
        subprocess.run(command, env=clean_env(PREFECT_HOME=str(made)), capture_output=True, check=True, timeout=300)
        _PREFECT_DB = made / "prefect.db"
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "prefect.db").exists():
        shutil.copyfile(_PREFECT_DB, home / "prefect.db")
    return home


def environment(prefect_home: Path) -> dict[str, str]:
    seeded_prefect_home(prefect_home)
    return clean_env(
        EACHLABS_API_KEY=KEY,
        FAL_KEY=KEY,
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        PREFECT_HOME=str(prefect_home),
    )


def soundpatch(*args: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """The command as users run it, to completion."""
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# Where `dying` kills the command (exit 137, nothing cleaned up):
# the moment it starts decoding a provider's paid answer (paid for, in memory only) ...
AT_DECODE = "from soundpatch.providers import hosted\nhosted.decode_result = lambda data: os._exit(137)\n"
# ... or the moment a clip's upload to staging is done (in the bucket, and the row not sent).
AFTER_STAGING = (
    "from soundpatch.staging import Staging\n"
    "upload = Staging.stage\n"
    "Staging.stage = lambda *a, **k: (upload(*a, **k), os._exit(137))\n"
)


def dying(where: str, *args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The command, killed `where` (AT_DECODE, AFTER_STAGING)."""
    script = (
        "import os, sys\n" + where + "from soundpatch.entry import main\n"
        "sys.argv = ['soundpatch', *sys.argv[1:]]\n"
        "sys.exit(main())\n"
    )
    command = [sys.executable, "-c", script, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def start(workdir: Path, env: dict[str, str], run_id: str, manifest: str = "job.csv") -> subprocess.Popen:
    return subprocess.Popen(
        [str(SCRIPT), "run", manifest, "--config", "job.yaml", "--run-id", run_id],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a kill reaches everything it started
    )


def finish(workdir: Path, env: dict[str, str], run_id: str) -> subprocess.CompletedProcess:
    return soundpatch("run", "job.csv", "--config", "job.yaml", "--run-id", run_id, cwd=workdir, env=env)


def finish_every_row(workdir: Path, env: dict[str, str], run_id: str, rows: int) -> pd.DataFrame:
    """Run it again to the end: exit 0, every row succeeded; the report."""
    done = finish(workdir, env, run_id)
    assert done.returncode == 0, done.stdout + done.stderr
    table = report(workdir, run_id)
    assert list(table["status"]) == ["succeeded"] * rows
    return table


def events(workdir: Path, run_id: str, kind: str) -> list[dict]:
    path = workdir / "runs" / run_id / "journal.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [e for e in (json.loads(x) for x in lines if x.endswith("}")) if e["event"] == kind]


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)
    proc.wait(timeout=30)


def report(workdir: Path, run_id: str) -> pd.DataFrame:
    return pd.read_csv(workdir / "runs" / run_id / "report.csv")


def assert_key_nowhere(key: str, shown: str, workdir: Path) -> None:
    """The key is not on screen, nor in the journal, reports or output metadata."""
    assert key not in shown
    for path in (workdir / "runs").rglob("*"):
        if path.is_file():
            assert key not in path.read_text(errors="ignore"), path
    for path in (workdir / "outputs").rglob("*.json"):
        assert key not in path.read_text()
