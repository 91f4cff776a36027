"""The installed `soundpatch` command: Prefect's temporary server first, then the rest.

A run without PREFECT_API_URL needs a temporary Prefect server, whose start takes
seconds (it imports the whole Prefect server). It is spawned here, before the rest of
soundpatch loads (numpy, pandas, scipy, Prefect's client: another 2 to 3 s), so that the
two overlap; `soundpatch run` takes it over. Every other command, and a run that stops
before its flow (bad config, missing manifest), leaves it unused, and it is stopped.
"""

from __future__ import annotations

import gc
import sys


def main() -> int:
    argv = sys.argv[1:]
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


if __name__ == "__main__":
    sys.exit(main())
