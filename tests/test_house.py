"""Structure the project promises: the core is plain Python, Prefect stays in flows/ and tasks/."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "soundpatch"


def test_the_core_never_imports_prefect():
    offenders = [
        str(p.relative_to(CORE.parent))
        for p in CORE.rglob("*.py")
        if re.search(r"^\s*(import prefect|from prefect)", p.read_text(), re.M)
    ]
    assert offenders == []


def test_validating_a_manifest_does_not_load_prefect():
    code = "import sys, soundpatch.cli, soundpatch.batch; print('prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_validating_a_manifest_does_not_load_scipy_signal(tmp_path):
    # scipy.signal (alignment, the local engine, loudness) takes over a second to import,
    # which `soundpatch validate` and `run --dry-run` never use: half their time. Nor do they
    # need the local engine's compiled solver (numba: another second).
    code = (
        "import sys\n"
        "from soundpatch.cli import main\n"
        f"assert main(['validate', {str(ROOT / 'manifests' / 'restoration.csv')!r}]) == 0\n"
        "print(sorted(m for m in ('scipy.signal', 'pyloudnorm', 'numba') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_only_a_real_run_starts_prefects_server_before_loading():
    from soundpatch.entry import _starts_a_run

    assert _starts_a_run(["run", "manifests/restoration.csv", "--run-id", "x"])
    assert not _starts_a_run(["run", "m.csv", "--dry-run"])  # spends nothing, needs no Prefect
    assert not _starts_a_run(["run", "--help"])
    assert not _starts_a_run(["validate", "m.csv"]) and not _starts_a_run([])


def test_a_configured_prefect_api_means_no_temporary_server(monkeypatch):
    from flows.ephemeral import TemporaryServer

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert TemporaryServer.unless_configured() is None


def test_a_prefect_server_or_database_in_the_active_profile_is_seen_before_prefect_loads(tmp_path, monkeypatch):
    from flows.ephemeral import TemporaryServer, new_database

    for setting in ("API_URL", "PROFILE", "PROFILES_PATH", "API_DATABASE_CONNECTION_URL"):
        monkeypatch.delenv(f"PREFECT_{setting}", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    (tmp_path / "profiles.toml").write_text(  # as `prefect config set` leaves it
        'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n'
        'PREFECT_SERVER_DATABASE_CONNECTION_URL = "postgresql+asyncpg://db/prefect"\n\n[profiles.solo]\n'
    )
    assert TemporaryServer.unless_configured() is None
    assert not new_database()  # a database of its own: not made here on a first run
    monkeypatch.setenv("PREFECT_PROFILE", "solo")  # as Prefect picks it: the variable wins
    assert new_database()
    server = TemporaryServer.unless_configured()
    assert server is not None
    server.stop()
    (tmp_path / "profiles.toml").write_text("active = [")  # unreadable: Prefect's default profile
    assert new_database()


def prefects_own(*fields: str) -> str:
    """Prefect's own reading of its settings, in a process started in the working folder."""
    code = "from prefect.settings import get_current_settings as s; import operator as o; import sys\n"
    code += "print(*(o.attrgetter(f)(s()) for f in sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, *fields], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_prefect_server_named_in_the_working_folders_files_is_seen_before_prefect_loads(tmp_path, monkeypatch):
    # Prefect 3 also reads .env, prefect.toml and pyproject.toml's [tool.prefect] in the working
    # folder, after the environment and before the profile. A server named there only was
    # found once Prefect loaded, after a temporary one had been spawned for nothing.
    from flows.ephemeral import TemporaryServer, new_database, prefect_setting

    for setting in ("API_URL", "PROFILE", "PROFILES_PATH", "API_DATABASE_CONNECTION_URL", "HOME"):
        monkeypatch.delenv(f"PREFECT_{setting}", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))  # no profile: Prefect's default one
    monkeypatch.chdir(tmp_path)
    team = "http://127.0.0.1:9/api"
    files = {
        ".env": f"PREFECT_API_URL={team}\n",
        "prefect.toml": f'[api]\nurl = "{team}"\n',
        "pyproject.toml": f'[project]\nname = "x"\n\n[tool.prefect.api]\nurl = "{team}"\n',
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        assert prefect_setting("PREFECT_API_URL") == team, name
        assert TemporaryServer.unless_configured() is None, name
        (tmp_path / name).unlink()
    assert prefect_setting("PREFECT_API_URL") == ""

    # In Prefect's order: the environment, .env, prefect.toml, pyproject.toml, the profile.
    (tmp_path / "pyproject.toml").write_text('[tool.prefect]\napi.url = "http://pyproject/api"\n')
    (tmp_path / "prefect.toml").write_text('api.url = "http://prefect-toml/api"\n')
    assert prefect_setting("PREFECT_API_URL") == "http://prefect-toml/api"
    (tmp_path / ".env").write_text("PREFECT_API_URL=http://dotenv/api\n")
    assert prefect_setting("PREFECT_API_URL") == "http://dotenv/api" == prefects_own("api.url")
    monkeypatch.setenv("PREFECT_API_URL", "http://environment/api")
    assert prefect_setting("PREFECT_API_URL") == "http://environment/api"

    # Where Prefect keeps its home, its database and its profiles can be named there too.
    (tmp_path / "project-home").mkdir()
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "team.toml").write_text('active = "t"\n[profiles.t]\nPREFECT_LOGGING_LEVEL = "DEBUG"\n')
    project = f'home = "{tmp_path / "project-home"}"\nprofiles_path = "profiles/team.toml"\n'
    (tmp_path / "prefect.toml").write_text(project)
    assert prefect_setting("PREFECT_LOGGING_LEVEL") == "DEBUG"  # from the profile that file names
    assert prefects_own("logging.level", "home") == f"DEBUG {tmp_path / 'project-home'}"
    assert new_database()
    (tmp_path / "project-home" / "prefect.db").touch()  # the database in the home prefect.toml names
    assert not new_database()
    (tmp_path / "project-home" / "prefect.db").unlink()
    (tmp_path / ".env").write_text("PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://db/prefect\n")
    assert not new_database()  # a database of its own: not made here on a first run


def test_prefects_server_imports_without_garbage_collection_and_serves_with_it():
    # The run's temporary server starts through flows.prefect_server; uvicorn is stubbed to
    # report the collector's state at the moment it would start serving.
    code = (
        "import gc, json, sys, uvicorn.main, flows.prefect_server as launcher\n"
        "uvicorn.main.main = lambda **kw: print(json.dumps([gc.isenabled(), gc.get_freeze_count(),\n"
        "    'prefect.server.api.server' in sys.modules, kw]))\n"
        "launcher.main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    enabled, frozen, imported, kwargs = json.loads(out.stdout)
    assert enabled  # on while it serves: a long run's cycles are collected
    assert imported and frozen > 100_000  # the server's modules, kept out of every later collection
    assert kwargs == {"prog_name": "uvicorn"}


def test_the_command_starts_without_loading_numpy_or_prefect_first():
    # The temporary server is spawned before the rest loads, so the entry must stay light.
    code = (
        "import sys, soundpatch.entry, flows.ephemeral; print(sorted({'numpy', 'prefect', 'httpx'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_what_the_temporary_server_prints_stays_off_the_terminal_unless_verbose(capfd):
    # Stopping Prefect's server can log a cancelled database call with a traceback; that is
    # not the user's business. When the server fails to start, what it printed is the error.
    from flows.ephemeral import TemporaryServer

    failing = [sys.executable, "-c", "import sys; sys.stderr.write('Traceback: no database here'); sys.exit(4)"]
    for show_output in (False, True):
        server = TemporaryServer(show_output=show_output)
        server._command, server._env = failing, dict(os.environ)  # a server that dies starting
        server._spawn()
        with pytest.raises(RuntimeError, match="exited with status 4 while starting") as raised:
            server.wait_ready(timeout=60)
        shown = capfd.readouterr()
        if show_output:  # --verbose: on the terminal as it happens
            assert "no database here" in shown.err
        else:
            assert "no database here" not in shown.out + shown.err
            assert str(raised.value).endswith("; it printed: Traceback: no database here")
        assert server._output is None  # its file is closed and gone


def test_a_temporary_server_that_stops_during_the_run_is_started_again_on_its_port_a_few_times(monkeypatch, caplog):
    # A stand-in for Prefect's server (its health check on the port it is given), killed
    # during the run: started again on the same port, RESTARTS times, then left down, saying
    # so each time; stopped by the run, it stays down.
    from flows import ephemeral
    from flows.ephemeral import TemporaryServer

    monkeypatch.setattr(ephemeral, "RESTARTS", 1)
    health = (
        "import sys, http.server\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200 if self.path == '/api/health' else 404); self.end_headers()\n"
        "    def log_message(self, *a): pass\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[2])), H).serve_forever()\n"
    )
    server = TemporaryServer()
    server.port = ephemeral._free_port()
    server._command, server._env = [sys.executable, "-c", health, "--port", str(server.port)], dict(os.environ)
    server._spawn()
    server.wait_ready(timeout=30)
    server.watch()
    caplog.set_level("WARNING", logger="soundpatch")

    first = server.process
    assert first is not None
    first.kill()
    deadline = time.monotonic() + 30
    while server.process is first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.process is not first  # another process, on the same port
    server.wait_ready(timeout=30)
    assert httpx.get(f"{server.api_url}/health").status_code == 200
    assert caplog.messages == [
        "Prefect's temporary server stopped during the run (killed by SIGKILL); it was started again on the same "
        "port and database, and the run goes on."
    ]
    second = server.process
    assert second is not None
    second.kill()
    time.sleep(1)  # the watch looks four times a second
    assert server.process is second and second.poll() is not None  # not started again
    assert caplog.messages[1].startswith("Prefect's temporary server stopped again (killed by SIGKILL), 2 times")
    server.stop()
    assert server.process is None and server._watcher is not None
    server._watcher.join(timeout=5)
    assert not server._watcher.is_alive()


def test_a_temporary_server_stopped_by_the_run_is_not_started_again():
    from flows import ephemeral
    from flows.ephemeral import TemporaryServer

    server = TemporaryServer()
    server.port = ephemeral._free_port()
    server._command, server._env = [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ)
    server._spawn()
    server.watch()
    server.stop()
    assert server._watcher is not None
    server._watcher.join(timeout=5)
    assert not server._watcher.is_alive() and server.process is None


def test_prefects_own_warnings_reach_the_terminal_once_each_on_one_line():
    # With its server away, Prefect's services said so for every event (printed whole) and
    # every slot (with a traceback), for as long as the run lasted.
    import io
    import logging

    from flows.prefect_messages import OncePerKind

    shown = io.StringIO()
    handler = logging.StreamHandler(shown)
    handler.addFilter(OncePerKind())
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    names = ("prefect._internal.t", "prefect.task_runs.t", "soundpatch.t")
    internal, runs, ours = (logging.getLogger(name) for name in names)
    for logger in (internal, runs, ours):
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)
    event = "Event(" + "resource=" * 300 + ")"
    try:
        for n in range(3):
            internal.error("Service %r failed to process item %r", "EventsWorker", event)
            try:
                raise ConnectionError("refused")
            except ConnectionError:
                runs.warning("Failed to release concurrency lease %s during cleanup", n, exc_info=True)
            ours.warning("a slot of ours %s", n)
            runs.info("an info line %s", n)
    finally:
        for logger in (internal, runs, ours):
            logger.removeHandler(handler)
            logger.propagate = True
            logger.setLevel(logging.NOTSET)
    lines = shown.getvalue().splitlines()
    said = "prefect._internal.t ERROR Service 'EventsWorker' failed to process item 'Event(resource="
    assert lines[0].startswith(said) and lines[0].endswith("...")
    assert len(lines[0]) == len("prefect._internal.t ERROR ") + 300
    # No traceback:
    assert lines[1] == "prefect.task_runs.t WARNING Failed to release concurrency lease 0 during cleanup"
    # soundpatch's own and Prefect's below a warning, as they are, every time.
    assert lines[2:] == [
        "soundpatch.t WARNING a slot of ours 0",
        "prefect.task_runs.t INFO an info line 0",
        "soundpatch.t WARNING a slot of ours 1",
        "prefect.task_runs.t INFO an info line 1",
        "soundpatch.t WARNING a slot of ours 2",
        "prefect.task_runs.t INFO an info line 2",
    ]


def test_prefects_events_worker_sending_what_it_held_at_the_end_of_a_run_is_not_shown_as_a_warning():
    # The run makes Prefect's workers send what they hold before its temporary server stops;
    # when they held any, a run that went well ended with "WARNING | EventsWorker - Still
    # processing items: 3 items remaining..." (most reruns of a finished run did).
    import asyncio
    import io
    import logging

    from prefect.events import Event
    from prefect.events.clients import NullEventsClient
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.prefect_messages import OncePerKind

    class SlowServer(NullEventsClient):  # each event takes a while to send, as over a network
        async def emit(self, event: Event) -> None:
            await asyncio.sleep(0.2)

    shown = io.StringIO()
    handler = logging.StreamHandler(shown)
    handler.addFilter(OncePerKind())
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)  # where Prefect's console handler is
    failing = logging.getLogger("EventsWorker")
    try:
        with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
            worker = EventsWorker.instance(SlowServer)
            for n in range(3):
                worker.send(Event(event="soundpatch.test", resource={"prefect.resource.id": f"soundpatch.row.{n}"}))
            EventsWorker.drain_all(timeout=10)
        # Its other warnings are shown, once each, as Prefect's are.
        for _ in range(2):
            failing.warning("Service %r queue is full (%d items), dropping item", "EventsWorker", 50000)
    finally:
        logging.getLogger().removeHandler(handler)
    assert shown.getvalue().splitlines() == [
        "EventsWorker WARNING Service 'EventsWorker' queue is full (50000 items), dropping item"
    ]
