"""Prefect's temporary API server for a run, out of reach of the terminal's Ctrl-C.

With no PREFECT_API_URL (in the environment, the working folder's .env, prefect.toml or
pyproject.toml, or the active profile as `prefect config set` and `prefect cloud login`
write it), a run needs a temporary Prefect server. We start the same server Prefect would
(its API app under uvicorn, UI and background services off), with these differences:
- in its own session, and Linux ends it when we end (even by kill -9): a Ctrl-C in a
  terminal signals the whole process group, and a server dying while soundpatch still
  finishes the predictions in flight (paid for) would hang the run;
- started as early as possible and awaited only when the flow begins: importing the
  server takes seconds (5 s on a 2-core machine), which now overlap with our own start;
- the parent never imports the server's code (Prefect's own launcher does, another 5 s);
- the server imports with the garbage collector off (flows/prefect_server.py): 1.5 to
  2 s sooner ready;
- what it prints goes to a temporary file, not the user's terminal (`--verbose` shows
  it): stopping it can log a cancelled database call with a traceback, which says
  nothing about the run. If it fails to start, the end of that file is in the error;
- should it stop while the run goes on (the kernel's OOM killer, a `pkill`), it is
  started again on the same port with the same database (`watch`): Prefect's clients
  then reach it again. Left dead, each of Prefect's calls retried for a minute (rows
  stopped starting meanwhile) and its events worker tried every event it held, 7 s
  apiece, printing each whole on the terminal: minutes after the last row, the command
  had still not ended.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_PR_SET_PDEATHSIG = 1
STARTUP_TIMEOUT_SECONDS = 120  # a first run on a new PREFECT_HOME migrates a database
_ADDRESS_IN_USE = 3  # uvicorn's exit status when the port was taken meanwhile
RESTARTS = 3  # times the server is started again in one run, should it keep stopping
log = logging.getLogger("soundpatch")


def _die_with_parent() -> None:  # runs in the child, between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TemporaryServer:
    """A Prefect API server process for this run; `start()` returns at once."""

    def __init__(self, show_output: bool = False) -> None:
        self.process: subprocess.Popen | None = None
        self.port = 0
        self._command: list[str] = []
        self._env: dict[str, str] = {}
        self._show_output = show_output
        self._output: IO[bytes] | None = None  # what the server printed, when not shown
        self.new_database = False  # whether it makes Prefect's database first (a first run here)
        self._lock = threading.Lock()  # the process, between stop() and the watch
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @classmethod
    def unless_configured(cls, show_output: bool = False) -> TemporaryServer | None:
        """A server started now, unless PREFECT_API_URL names one to use (`prefect_setting`;
        should Prefect's settings name one all the same once it loads, this one is stopped
        then: `isolated_api`)."""
        return None if prefect_setting("PREFECT_API_URL") else cls(show_output).start()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> TemporaryServer:
        """Spawn the server without importing Prefect here (that alone takes seconds): it
        reads its settings from the same environment, profile and files as we do."""
        self.port = _free_port()
        self.new_database = new_database()
        env = {
            # Defaults for a server that lives as long as one run: task runs, flow runs and
            # artifacts are recorded as usual (in PREFECT_HOME's database, for `prefect
            # server start` to show later), but the raw event stream is not stored and no
            # automations are evaluated (a quarter of its CPU on a 400-row batch), and the
            # task runs' states are written in batches, every 2 s or 500 events, rather than
            # one transaction an event (its CPU on a 400-row batch: 15 s -> 7 s; the last
            # batch is written as it stops). These settings in the environment win.
            "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "500",
            "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "2",
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",  # no UI, only the services an ephemeral server needs
            "PREFECT__SERVER_FINAL": "1",
        }
        spec = importlib.util.find_spec("prefect")
        assert spec is not None and spec.origin is not None, "prefect is a dependency"
        # fmt: off
        self._command = [
            sys.executable, "-m", "flows.prefect_server", "--app-dir", str(Path(spec.origin).parent.parent),
            "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
            "--port", str(self.port), "--log-level", "error", "--lifespan", "on",
        ]
        # fmt: on
        self._env = env
        self._spawn()
        return self

    def _spawn(self) -> None:
        if not self._show_output and self._output is None:
            self._output = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            self._command,
            env=self._env,
            stdout=self._output,
            stderr=self._output,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def _printed(self) -> str:
        """The end of what the server printed (when it was not shown), for an error message."""
        if self._output is None:
            return ""
        self._output.seek(0, os.SEEK_END)
        self._output.seek(max(0, self._output.tell() - 2000))
        tail = self._output.read().decode("utf-8", "replace").strip()
        return f"; it printed: {tail}" if tail else ""

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        assert self.process is not None, "start() first"
        import httpx  # noqa: PLC0415 - not before it is needed: the server is spawned first thing

        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                code = self.process.poll()
                if code == _ADDRESS_IN_USE:  # another process took the port: try another
                    self.port = _free_port()
                    self._command[self._command.index("--port") + 1] = str(self.port)
                    self._spawn()
                    continue
                if code is not None:
                    printed = self._printed()
                    self.stop()
                    raise RuntimeError(f"Prefect's temporary server exited with status {code} while starting{printed}")
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        printed = self._printed()
        self.stop()
        raise RuntimeError(f"Prefect's temporary server did not answer within {timeout:g} s{printed}")

    def watch(self) -> None:
        """From now on (the server answered, and Prefect's clients use its port), start it
        again on that port should it stop before `stop()`, RESTARTS times at the most (one
        that stops while it starts again counts too). Prefect's clients retry meanwhile."""
        self._watcher = threading.Thread(target=self._keep_up, name="prefect-server-watch", daemon=True)
        self._watcher.start()

    def _keep_up(self) -> None:
        for restart in range(1, RESTARTS + 2):
            while (process := self.process) is not None and process.poll() is None:
                if self._stopping.wait(0.25):
                    return
            with self._lock:
                if self._stopping.is_set() or self.process is None:
                    return
                how = _ended(self.process.returncode)
                if restart > RESTARTS:
                    log.warning(
                        "Prefect's temporary server stopped again (%s), %d times in this run: not started again. "
                        "The rows go on, but Prefect records no more of the run, and the command may take "
                        "minutes to end after its summary.",
                        how,
                        RESTARTS + 1,
                    )
                    return
                self._spawn()
            log.warning(
                "Prefect's temporary server stopped during the run (%s); it was started again on the same "
                "port and database, and the run goes on.",
                how,
            )

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            if self.process is not None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
                self.process = None
            if self._output is not None:
                self._output.close()
                self._output = None


def _ended(code: int) -> str:
    """How a process ended, in words, from its return code."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def new_database() -> bool:
    """Whether Prefect's server will make its database before it answers (its migrations
    take 10 s and more on a 2-core machine): its default SQLite file in PREFECT_HOME is not
    there yet. A database configured elsewhere is not guessed at."""
    if any(prefect_setting(f"PREFECT_{part}_DATABASE_CONNECTION_URL") for part in ("API", "SERVER")):
        return False
    return not (_prefect_home() / "prefect.db").exists()


# Where Prefect's TOML files (prefect.toml, pyproject.toml's [tool.prefect]) hold the
# settings read here: by field, not by variable name (`api.url` for PREFECT_API_URL).
_TOML_KEYS = {
    "PREFECT_HOME": ("home",),
    "PREFECT_PROFILES_PATH": ("profiles_path",),
    "PREFECT_API_URL": ("api", "url"),
    "PREFECT_SERVER_DATABASE_CONNECTION_URL": ("server", "database", "connection_url"),
}


def prefect_setting(name: str) -> str:
    """A Prefect setting ("" if unset), from where Prefect reads it, in its order: the
    environment, then the working folder's .env, prefect.toml and pyproject.toml
    ([tool.prefect]), then the active profile (where `prefect config set` and `prefect
    cloud login` keep it). Read without importing Prefect, which would take the seconds
    the early start saves."""
    value = _project_setting(name) or _active_profile().get(name)
    return str(value) if value else ""


def _project_setting(name: str) -> str:
    """A setting from the environment or the working folder's files, "" if none has it."""
    value: Any = os.environ.get(name)
    if not value and Path(".env").is_file():
        import dotenv  # noqa: PLC0415 - Prefect's own reader of .env files, loaded only when there is one

        value = dotenv.dotenv_values(".env").get(name)
    for path, table in (("prefect.toml", ()), ("pyproject.toml", ("tool", "prefect"))):
        if not value and name in _TOML_KEYS:
            value = _toml_value(Path(path), (*table, *_TOML_KEYS[name]))
    return str(value) if value else ""


def _toml_value(path: Path, keys: tuple[str, ...]) -> Any:
    try:
        found: Any = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None  # none there (an unreadable one stops Prefect itself, with its own message)
    for key in keys:
        found = found.get(key) if isinstance(found, dict) else None
    return found


def _active_profile() -> dict[str, Any]:
    """The settings of the active profile in the profiles file, as Prefect picks them."""
    home = os.environ.get("PREFECT_HOME")  # here Prefect looks at the environment's only
    default = Path(home) / "profiles.toml" if home else Path.home() / ".prefect" / "profiles.toml"
    path = Path(_project_setting("PREFECT_PROFILES_PATH") or default).expanduser()
    try:
        profiles = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}  # none: Prefect's own default profile, which names no server
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active")
    settings = profiles.get("profiles", {}).get(active) if isinstance(active, str) else None
    return settings if isinstance(settings, dict) else {}


def _prefect_home() -> Path:
    return Path(prefect_setting("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def quiet_prefect(verbose: bool) -> None:
    """Keep Prefect's own chatter (and the ephemeral server's shutdown noise) off the screen.

    Only defaults: a user's explicit PREFECT_* settings win.
    """
    # An offline batch tool does not phone home, and Prefect's notice about it is noise.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        # The in-process ephemeral server logs cancelled background flushes at shutdown.
        os.environ.setdefault("PREFECT_LOGGING_SERVER_LEVEL", "CRITICAL")
        # A flow that stops on an error is reported by us in one sentence (details in
        # runs/<id>/errors.log); Prefect's own traceback of it would only repeat that.
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL", "CRITICAL")


def api_configured() -> bool:
    from prefect.settings import PREFECT_API_URL  # noqa: PLC0415

    return bool(PREFECT_API_URL.value())


@contextmanager
def isolated_api(server: TemporaryServer | None = None) -> Iterator[None]:
    """Use the configured Prefect API, or a temporary one the run owns (pass one already
    started to overlap its start-up with other work)."""
    if api_configured():
        if server is not None:
            server.stop()
        yield
        return
    from prefect.settings import (  # noqa: PLC0415
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    server = server or TemporaryServer().start()
    try:
        server.wait_ready(max(STARTUP_TIMEOUT_SECONDS, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
        # No flow run heartbeats: they tell a lasting server that a run died, and this one
        # dies with the run. Their thread sleeps in whole seconds and is waited for when
        # the flow ends, up to a second at the end of every run.
        with temporary_settings({PREFECT_API_URL: server.api_url, "flows.heartbeat_frequency": None}):
            server.watch()
            try:
                yield
            finally:
                _send_what_prefect_holds()
    finally:
        server.stop()


def configured_server_away() -> tuple[str, str] | None:
    """(its URL, why) when a Prefect server of the user's is configured and does not answer;
    None when it answers, or none is configured. Only a connection is opened: nothing is
    sent, no key, and TLS is not verified."""
    if not api_configured():
        return None
    import httpx  # noqa: PLC0415
    from prefect.settings import PREFECT_API_URL  # noqa: PLC0415

    url = str(PREFECT_API_URL.value()).rstrip("/")
    try:
        with httpx.Client(timeout=AWAY_SECONDS, verify=False) as client:  # noqa: S501 - reachability only
            client.get(f"{url}/health")
        return None  # it answers, whatever it says
    except httpx.TransportError as exc:
        return url, (f"{type(exc).__name__}: {str(exc)[:120]}" if str(exc) else type(exc).__name__)


def leave_if_prefect_is_away(code: int) -> None:
    """End the process now, with exit status `code`, when the Prefect server the user
    configured does not answer once the run is over; return otherwise.

    Prefect sends the events and logs it still holds at interpreter exit, trying each one
    ~7 s against a server that is away and printing each failure whole: with that server
    down (an upgrade during the nightly run, a laptop off its VPN), the command went on for
    minutes after its summary. Everything of the run's own is written and flushed by now
    (its journal, report and outputs); what Prefect held for its server is dropped, saying so.
    A command that ran nothing (exit 2) held nothing for it: it ends as it would."""
    away = configured_server_away() if code != EXIT_NOTHING_RAN else None
    if away is None:
        return  # (a temporary server: its run sent what Prefect held before stopping it)
    url, why = away
    sys.stdout.flush()
    sys.stderr.write(
        f"Prefect's server at {url} does not answer ({why}): the events and logs Prefect still held for it "
        "are dropped rather than tried for minutes, 7 s each (the run's own journal and report have all of it).\n"
    )
    sys.stderr.flush()
    os._exit(code)


EXIT_NOTHING_RAN = 2  # soundpatch.outcome's: flows/ does not load the core before the command needs it
# How long the configured Prefect server may take to accept a connection at the end of a run.
AWAY_SECONDS = 3.0


def _send_what_prefect_holds(timeout: float = 10) -> None:
    """Send the run's logs and events Prefect still holds, while the server answers.

    Prefect sends them from background workers, in batches. Those still queued when the
    temporary server stopped were sent at interpreter exit instead, to nothing: each
    retried with backoff for over a minute, then "--- Error logging to API ---" on
    stderr. Whenever Prefect's logs go to the API (--verbose, or PREFECT_LOGGING_LEVEL=INFO
    as many Prefect users set), the command hung that long after its summary."""
    from prefect.events.worker import EventsWorker  # noqa: PLC0415
    from prefect.logging.handlers import APILogWorker  # noqa: PLC0415

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)
