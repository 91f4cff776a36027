"""The installed `soundpatch` command: Prefect's temporary server first, then the rest.

A run without PREFECT_API_URL needs a temporary Prefect server, whose start takes
seconds (it imports the whole Prefect server). It is spawned here, before the rest of
soundpatch loads (numpy, pandas, scipy, Prefect's client: another 2 to 3 s), so that the
two overlap; `soundpatch run` takes it over. Every other command, and a run that stops
before its flow (bad config, missing manifest), leaves it unused, and it is stopped.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def main() -> int:
    argv = sys.argv[1:]
    _fewer_heaps()
    server = None
    if _starts_a_run(argv):
        from flows.ephemeral import TemporaryServer, quiet_prefect

        verbose = "--verbose" in argv
        quiet_prefect(verbose)  # the server reads the same settings
        server = TemporaryServer.unless_configured(show_output=verbose)
    try:
        from soundpatch.cli import main as cli_main

        code = cli_main(argv, server=server)
    finally:
        if server is not None:
            server.stop()  # already stopped if the run used it
    if _starts_a_run(argv):
        from flows.ephemeral import leave_if_prefect_is_away

        leave_if_prefect_is_away(code)  # Prefect's server of the user's is away: ends the process
    # Everything is written and flushed: skip the cyclic garbage collection at exit, a
    # second of CPU for a process that has loaded Prefect and pandas.
    gc.freeze()
    return code


def _starts_a_run(argv: list[str]) -> bool:
    return bool(argv) and argv[0] == "run" and not {"-h", "--help", "--dry-run"} & set(argv)


def _fewer_heaps() -> None:
    """glibc's malloc gives threads heaps of their own ("arenas"), up to eight a core, and
    gives little of them back: the local engine's rows, in turn on every row thread, left
    a 30-minute tape's run at 2.1-2.3 GB resident where one heap a core held 1.3-1.4 GB, in
    no more time (the README's memory section). Set before any thread starts, for this
    process; MALLOC_ARENA_MAX in the environment, if set, has the last word."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, max(2, os.cpu_count() or 2))
    except (OSError, AttributeError):
        pass  # not glibc (musl has no arenas to bound)


if __name__ == "__main__":
    sys.exit(main())
