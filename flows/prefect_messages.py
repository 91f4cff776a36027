"""Prefect's own warnings and errors on the terminal: one line each, and each kind once.

When Prefect cannot reach its server (a server of the user's going away mid-run), its
background services say so for every event, log batch and concurrency slot they hold:
the whole event printed (1,600-1,900 characters), a traceback of 40 lines for each slot
it could not give back, again and again for as long as the run lasts, burying the run's
own progress and messages (which say what happened in one line, and what to do). On the
terminal, each such message now appears once, without its traceback, cut to a line;
`--verbose` shows them all, in full. Prefect's server gets its logs as before.

Prefect's log shipper says it could not send a batch of logs by writing straight to stderr,
as the logging module does with a handler's own failures when `logging.raiseExceptions` is
set: "--- Error logging to API ---", then the error with no line end, so that the progress
line ran on after it. That setting is off for the run, as Python's documentation advises for
applications (`--verbose` leaves it on): Prefect's events worker says the server cannot be
reached, once, and the run's last line says what it held was dropped.

The run sends what Prefect's events and log workers still hold before its temporary server
stops (flows/ephemeral.py). When they held any, the events worker said "WARNING |
EventsWorker - Still processing items: 3 items remaining..." on a run that went well (most
reruns of a finished run did): that is not shown either.
"""

from __future__ import annotations

import logging
import threading

MAX_CHARACTERS = 300
# Prefect's background services log under their class names, outside "prefect".
PREFECT_SERVICES = ("EventsWorker", "APILogWorker")
# What they say while they are made to send what they hold: a note on their way, not a fault.
STILL_SENDING = "Still processing items"


class OncePerKind(logging.Filter):
    """Lets a Prefect warning or error through the first time its message template (per
    logger) is seen, as one line; later ones of the same kind are not shown, nor its
    services' notes that they are still sending what they hold."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name in PREFECT_SERVICES and str(record.msg).startswith(STILL_SENDING):
            return False
        prefects = record.name.startswith("prefect") or record.name in PREFECT_SERVICES
        if record.levelno < logging.WARNING or not prefects:
            return True
        kind = (record.name, str(record.msg))
        with self._lock:
            if kind in self._seen:
                return False
            self._seen.add(kind)
        # The console handler is the last to see the record (the API's handler is on the
        # run loggers themselves, which hand it on afterwards): shortening it here leaves
        # what Prefect's server is sent whole.
        message = " ".join(record.getMessage().split())
        if len(message) > MAX_CHARACTERS:
            message = message[: MAX_CHARACTERS - 3] + "..."
        record.msg, record.args, record.exc_info, record.exc_text, record.stack_info = message, None, None, None, None
        return True


def condense_prefect_messages() -> None:
    """Put `OncePerKind` on the handlers through which Prefect's messages reach the terminal
    (once Prefect has set up its logging: importing its flow decorator does)."""
    logging.raiseExceptions = False  # (see above)
    once = OncePerKind()  # each run anew (a notebook may run several in one process)
    for name in ("", "prefect", "prefect._internal"):  # Prefect's console handler is the root logger's
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler):
                for earlier in [f for f in handler.filters if isinstance(f, OncePerKind)]:
                    handler.removeFilter(earlier)
                handler.addFilter(once)
