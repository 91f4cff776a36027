"""A run asked to stop (Ctrl-C, SIGTERM): no new rows start, what is in flight finishes.

The CLI installs the handlers: the first signal sets the stop flag (the flow stops
submitting; providers cancel in-flight predictions only with `provider.on_interrupt:
cancel`), a second one ends the process at once (the journal still lets the run resume).
Prefect replaces the SIGTERM handler while a flow runs, so the flow re-asserts ours.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

_STOP = threading.Event()
_handler: Callable[[int, Any], None] | None = None


def request_stop() -> None:
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def reset() -> None:
    _STOP.clear()


def install(handler: Callable[[int, Any], None]) -> None:
    global _handler
    _handler = handler
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def reassert() -> None:
    """Put our SIGTERM handler back (Prefect installs its own for the flow's duration)."""
    if _handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)
