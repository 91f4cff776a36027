"""Prefect's temporary API server for a run, out of reach of the terminal's Ctrl-C.

With no PREFECT_API_URL, Prefect starts a temporary server as a child process in our
process group. A Ctrl-C in a terminal signals the whole group, so the server would die
while soundpatch is still finishing the predictions in flight (which it must: they are
paid), and the run would hang. We start that same server ourselves, from the main
thread, in its own session, and ask Linux to end it when we end (even by kill -9), so
it never outlives the run.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

_PR_SET_PDEATHSIG = 1
STARTUP_TIMEOUT_SECONDS = 120


def _die_with_parent() -> None:  # runs in the child, between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _isolated_popen(*args, **kwargs) -> subprocess.Popen:
    kwargs.setdefault("start_new_session", True)
    kwargs.setdefault("preexec_fn", _die_with_parent)
    return subprocess.Popen(*args, **kwargs)


@contextmanager
def isolated_api() -> Iterator[None]:
    """Use the configured Prefect API, or a temporary one the run owns."""
    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api import server as prefect_server

    proxy = types.SimpleNamespace(**{k: getattr(subprocess, k) for k in dir(subprocess) if not k.startswith("__")})
    proxy.Popen = _isolated_popen
    original = prefect_server.subprocess
    prefect_server.subprocess = proxy  # only for the spawn below, from this thread
    try:
        server = prefect_server.SubprocessASGIServer()
        # A first run on a new PREFECT_HOME creates and migrates the server's database;
        # on a busy 2-core machine that alone can pass Prefect's default of 20 s.
        server.start(timeout=max(STARTUP_TIMEOUT_SECONDS, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    finally:
        prefect_server.subprocess = original
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        server.stop()
