"""Whether a provider is being reached at all (and the staging bucket it fetches clips from).

A provider that is down, a base URL that is wrong or a key it refuses fails every row the
same way, each after its retries: hours of a long batch spent on nothing (nothing is paid,
but nothing is made). Once `after` creates in a row have come to nothing (turned away
after every retry, refused for the key, or left without an answer), the run sends that
provider no more: the rows left fail at once, saying why, and a rerun with the same
--run-id does them. Any create the provider takes, or refuses for the row's own content,
sets the count back. The staging bucket (staging.py) is counted the same way, by the
clips it does and does not take.
"""

from __future__ import annotations

import threading


class Reach:
    """`tries`: what is counted, as the sentence names it ("creates to it")."""

    def __init__(self, after: int, tries: str = "creates to it") -> None:
        self.after = after
        self.tries = tries
        self._missed = 0
        self._last = ""
        self._until: str | None = None  # what the last one said the rerun waits for, if it said
        self._lock = threading.Lock()

    def answered(self) -> None:
        """A create the provider took (or judged on the row's own content)."""
        with self._lock:
            self._missed = 0

    def missed(self, why: str, until: str | None = None) -> None:
        """A create that came to nothing for a reason that is not the row's: `why`, in words;
        `until`: what a rerun waits for, when it is not just an answer (credit topped up)."""
        with self._lock:
            self._missed += 1
            self._last = why.strip().rstrip(".")
            self._until = until

    @property
    def until(self) -> str | None:
        """What the last create that came to nothing said a rerun waits for, if it said."""
        with self._lock:
            return self._until

    def lost(self) -> str | None:
        """None while the provider is within reach; else what happened, in words."""
        with self._lock:
            if self._missed < self.after:
                return None
            return f"the last {self._missed} {self.tries} all came to nothing, the last one with: {self._last}"
