"""The run's progress, read from its journal as it grows: a live line in a terminal (a bar,
rows done, failed, money spent, in flight, time left), a plain line every 10 s in a log, or
every so often to a logger of the caller's (`say`: the flow run's log in Prefect's UI, for
a run no terminal shows)."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from soundpatch.estimate import TYPICAL_SECONDS
from soundpatch.humanize import duration
from soundpatch.journal import JournalTail
from soundpatch.outcome import FAILED, INVALID, SKIPPED_DONE, SUCCEEDED
from soundpatch.pace import Pace

MIN_BAR, MAX_BAR = 6, 40  # the live line's bar, in columns


class ProgressWatcher:
    """Shows rows done / failed / spent by reading the run's journal as it grows."""

    def __init__(
        self,
        run_dir: Path,
        total: int,
        budget: float,
        new_database: bool = False,
        console: Console | None = None,
        say: Callable[[str], None] | None = None,
        every: float = 10.0,
    ) -> None:
        """`new_database`: Prefect's temporary server makes its database first (a first run
        here). `console`: where the line goes (standard error by default); or `say`, a
        plain line every `every` seconds and one at the end."""
        self.run_dir, self.total, self.budget = run_dir, total, budget
        self.console = console or Console(stderr=True, highlight=False)
        self._say = say or (lambda line: self.console.print(line, soft_wrap=True))  # one line in a log, however long
        self._live, self._every = say is None and self.console.is_terminal, every
        # Until the flow begins (this attempt's run_started), Prefect is starting: seconds,
        # more on a first run. What an earlier attempt of the run wrote came before `_since`.
        self._since, self._begun = time.time() - 0.01, False
        self._starting = (
            "starting Prefect (a first run here also sets up its database)..."
            if new_database
            else "starting Prefect..."
        )
        self._stop = threading.Event()
        # The line is read and said in the context the watcher was made in: a logger of the
        # caller's may need it (a Prefect flow run's sends to the API its settings name, which
        # a new thread's context lacks: Prefect then started a server of its own to send to).
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._loop,), daemon=True)
        self._tail = JournalTail(run_dir)
        # Only what the line shows, kept up to date event by event: a long run's journal is
        # neither kept in memory nor added up again four times a second.
        self._last: dict[str, tuple[int, int, float]] = {}  # row -> (done, bad, cost) of its last outcome
        self._to_redo: set[str] = set()  # rows whose last outcome a rerun does again (not succeeded or reused)
        self._done, self._bad, self._spent = 0, 0, 0.0
        self._sent: set[str] = set()  # rows sent and not yet ended
        self._flying: set[str] = set()  # of which, predictions in flight (limits.concurrency)
        self._finishing: set[str] = set()  # of which, predictions back, their results spliced and saved
        self._waiting: set[str] = set()  # rows waiting for another run making the same edit
        self._short_of_disk: set[str] = set()  # rows waiting for room on disk for their result
        self._short_of_budget: set[str] = set()  # rows waiting for predictions in flight to settle
        self._short_of_memory: set[str] = set()  # rows waiting for room to decode their recording
        self._files = self._files_made = self._files_not_made = 0  # files of several rows (combine.py)
        self._said = ""  # the last plain line said (the one at the end is not said twice)
        self.pace = Pace(typical=TYPICAL_SECONDS)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _state(self) -> tuple[int, int, float, int, int, int, int, int, int]:
        for e in self._tail.poll():
            kind, row = e.get("event"), e.get("row")
            if kind == "waiting":
                self._waiting.add(row)
            elif kind == "waiting_for_disk":
                self._short_of_disk.add(row)
            elif kind == "waiting_for_budget":
                self._short_of_budget.add(row)
            elif kind == "waiting_for_memory":
                self._short_of_memory.add(row)
            elif kind == "memory_granted":
                self._short_of_memory.discard(row)
            elif kind == "sending":
                self._waiting.discard(row)
                self._short_of_disk.discard(row)
                self._short_of_budget.discard(row)
                self._short_of_memory.discard(row)
                self._sent.add(row)
                self.pace.sent(e["t"], e.get("provider") or "", row)
            elif kind in ("creating", "created", "computing"):  # a prediction in flight (or taken up
                # again); the local engine's row, worked on once it has its slot (limits.concurrency)
                self._flying.add(row)
                self.pace.created(e["t"], row)
            elif kind == "predicted":
                self._flying.discard(row)
                self._finishing.add(row)
            elif kind == "outcome":
                self._waiting.discard(row)
                self._short_of_disk.discard(row)
                self._short_of_budget.discard(row)
                self._short_of_memory.discard(row)
                self._flying.discard(row)
                self._finishing.discard(row)
                self.pace.ended(e["t"], e["outcome"].get("provider") or "", sent=row in self._sent, row=row)
                self._sent.discard(row)
                status = e["outcome"]["status"]
                now = (int(bool(status)), int(status in (FAILED, INVALID)), e["outcome"].get("cost_usd") or 0.0)
                was = self._last.get(row, (0, 0, 0.0))  # an earlier attempt's, on a resumed run
                self._last[row] = now
                self._done += now[0] - was[0]
                self._bad += now[1] - was[1]
                self._spent += now[2] - was[2]
                (self._to_redo.discard if status in (SUCCEEDED, SKIPPED_DONE) else self._to_redo.add)(row)
            elif kind == "run_started":  # patterns in the manifest are expanded by now
                self._begun = self._begun or float(e.get("t") or 0) >= self._since
                self.total = int(e.get("total") or self.total)
                # A rerun does again the rows an earlier attempt did not finish: not done (nor
                # failed) until they end again; what they cost still counts.
                for row in self._to_redo:
                    done, bad, cost = self._last[row]
                    self._done, self._bad, self._last[row] = self._done - done, self._bad - bad, (0, 0, cost)
                self._to_redo.clear()
                self._sent.clear()  # an earlier attempt's rows that never ended are sent again
                self._flying.clear()
                self._finishing.clear()
                for waiting in (self._waiting, self._short_of_disk, self._short_of_budget, self._short_of_memory):
                    waiting.clear()  # ... and those that were waiting then start over
                self.pace.restarted(e.get("providers"), e.get("limits"))
            elif kind == "combining":
                self._files, self._files_made, self._files_not_made = int(e.get("files") or 0), 0, 0
            elif kind == "combined" and e.get("output"):
                self._files_made += 1
            elif kind == "combined":  # none of its rows finished, or it could not be written: a note says why
                self._files_not_made += 1
        waited = len(self._waiting), len(self._short_of_disk), len(self._short_of_budget), len(self._short_of_memory)
        done = min(self._done, self.total)
        return done, self._bad, self._spent, len(self._flying), *waited, len(self._finishing)

    def _loop(self) -> None:
        if self._live:
            gauge = BarColumn()
            columns = [
                TextColumn("[progress.description]{task.description}"),
                gauge,
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
            ]
            done, *state = self._state()
            gauge.bar_width, detail = self._live_line(self.console.width, done, *state)
            with Progress(*columns, console=self.console, transient=True) as bar:
                task = bar.add_task("inpainting", total=self.total, completed=done, detail=detail)
                while not self._stop.wait(0.25):
                    done, *state = self._state()
                    gauge.bar_width, detail = self._live_line(self.console.width, done, *state)
                    bar.update(task, completed=done, total=self.total, detail=detail)
            return
        # Not a terminal (CI, a log file, a logger): a plain line every so often and one at the end.
        last = time.time()
        while not self._stop.wait(1.0):
            if time.time() - last >= self._every:
                self._print_line()
                last = time.time()
        self._print_line(final=True)

    def _live_line(
        self,
        width: int,
        done: int,
        bad: int,
        spent: float,
        flying: int,
        waiting: int,
        short: int,
        on_budget: int,
        on_memory: int = 0,
        finishing: int = 0,
    ) -> tuple[int, str]:
        """The bar's width and what the live line says beside it, to fit `width` columns: on
        a narrow terminal the bar shrinks first, then each part is said shorter, then the
        least telling parts go (rich would cut whatever came first, the count of rows done
        with it)."""
        # "inpainting", the count (N/M), the time so far (up to 9:59:59), the spaces between
        # the five columns, and one to spare: the terminal's last column wraps the line.
        fixed = len("inpainting") + 2 * len(str(self.total)) + 1 + len("0:00:00") + 4 + 1
        room = width - fixed - MIN_BAR
        if not self._begun:
            parts = [(0, self._starting, "starting Prefect...")]
        else:
            files = self._files_line()
            parts = [  # (the lower, the longer it stays; in full; short), shown in this order
                (0, f"{bad} failed or invalid", f"{bad} failed"),
                (1, f"${spent:.2f} of ${self.budget:.2f}", f"${spent:.2f}/${self.budget:.2f}"),
                (5, f"{flying} in flight", f"{flying} in flight"),
                # (in flight no more: the last rows' results, spliced and saved, are what is left)
                (5, f"{finishing} splicing and saving", f"{finishing} saving") if finishing else (5, "", ""),
                (3, f"{waiting} waiting for another run", f"{waiting} waiting") if waiting else (3, "", ""),
                (3, f"{short} waiting for disk space", f"{short} need disk") if short else (3, "", ""),
                (3, f"{on_budget} waiting on the budget", f"{on_budget} on budget") if on_budget else (3, "", ""),
                (3, f"{on_memory} waiting for memory", f"{on_memory} need memory") if on_memory else (3, "", ""),
                (4, f"files of several rows {files}", f"files {files}") if self._files else (4, "", ""),
                (2, self._left(done, "about {} left"), self._left(done, "~{} left")),
            ]
        detail = " · ".join(full for _, full, _ in parts if full)
        if len(detail) > room:
            for rank in sorted({rank for rank, _, _ in parts}, reverse=True):
                detail = " · ".join(short for r, _, short in parts if short and r <= rank)
                if len(detail) <= room or rank == 0:
                    break
        if len(detail) > room:
            detail = detail[: max(0, room - 1)] + "…"
        return max(MIN_BAR, min(MAX_BAR, width - fixed - len(detail))), detail

    def _print_line(self, final: bool = False) -> None:
        done, bad, spent, flying, waiting, short, on_budget, on_memory, finishing = self._state()
        if not self._begun:  # and when the flow never began, the error says why, not this
            if not final:
                self._say(f"progress: {self._starting}")
            return
        line = f"progress: {done}/{self.total} done, {bad} failed or invalid, ${spent:.2f} spent, {flying} in flight"
        line += f", {finishing} being spliced and saved" if finishing else ""
        line += f", {waiting} waiting for another run making the same edits" if waiting else ""
        line += f", {short} waiting for disk space for their results" if short else ""
        if on_budget:
            line += f", {on_budget} waiting on the budget until predictions in flight settle what they cost"
        if on_memory:
            line += f", {on_memory} waiting for memory to read their recordings in"
        line += f", files of several rows made: {self._files_line()}" if self._files else ""
        line += self._left(done, ", about {} left")
        if final and line == self._said:  # the rows ended just before the last line: it said so
            return
        self._said = line
        self._say(line)

    def _files_line(self) -> str:
        not_made = f" ({self._files_not_made} not made)" if self._files_not_made else ""
        return f"{self._files_made}/{self._files}{not_made}"

    def _left(self, done: int, words: str) -> str:
        seconds = self.pace.seconds_left(self.total - done)
        return words.format(duration(seconds)) if seconds is not None else ""
