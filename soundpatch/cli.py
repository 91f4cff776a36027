"""The `soundpatch` command. Flows (and so Prefect) are imported only when a run starts."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import sys
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from soundpatch import __version__, interrupt
from soundpatch.batch import Batch, new_run_id, preflight
from soundpatch.clicks import find_clicks
from soundpatch.config import MENDING_DAMAGED, Config, load_config
from soundpatch.disk_room import full_disk
from soundpatch.dropouts import find_dropouts
from soundpatch.edits import MAX_DAMAGED_SECONDS
from soundpatch.errors import RowError, SoundpatchError, as_sentence
from soundpatch.humanize import counts_by_name, duration, plural, some_rows
from soundpatch.humanize import size as human_size
from soundpatch.journal import latest_runs
from soundpatch.locks import RunLock
from soundpatch.manifest import GLOB_CHARS, Manifest
from soundpatch.manifest_source import read_manifest
from soundpatch.outcome import (
    EXIT_INTERRUPTED,
    EXIT_NOTHING_RAN,
    EXIT_ROWS_FAILED,
    STATUSES,
    Outcome,
    ToFinish,
    by_reason,
    exit_status,
)
from soundpatch.past_runs import past_runs
from soundpatch.progress import ProgressWatcher
from soundpatch.rerender import rerender
from soundpatch.restoration import (
    JOIN_SPANS_SECONDS,
    ROW_FOR_A_MODEL_SECONDS,
    ROW_OF_SPANS_SECONDS,
    Damage,
    restoration_manifest,
    row_counts,
)
from soundpatch.s3 import S3, S3Uri
from soundpatch.sources import RECORDING_SUFFIXES, SourceReader
from soundpatch.web import shown_input

if TYPE_CHECKING:
    from flows.ephemeral import TemporaryServer


class _Console(Console):
    """A console whose reader may go away (`soundpatch run ... | head`): what it prints then
    goes nowhere, and the command goes on to its end and its exit status. (Rich's own
    exits with 1 there, which says rows failed, or stops a run before it began.)"""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.file.fileno())  # and Python's flush at exit finds nothing to fail on
        os.close(devnull)


err = _Console(stderr=True, highlight=False)
out = _Console(highlight=False)


class _UsageError(SoundpatchError):
    pass


class _Parser(argparse.ArgumentParser):
    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """Arguments a command does not know are refused pointing at that command's help,
        not at soundpatch's (argparse leaves them for the top parser to refuse)."""
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = getattr(parsed, "command", None)
            where = f"soundpatch {command}" if command else self.prog
            raise _UsageError(f"Unrecognized arguments: {' '.join(unknown)} (see {where} --help).")
        return parsed

    def error(self, message: str) -> None:  # one sentence, exit 2, as for any other unusable input
        raise _UsageError(f"{message[:1].upper()}{message[1:]} (see {self.prog} --help).")


def main(argv: list[str] | None = None, server: TemporaryServer | None = None) -> int:
    """`server`: Prefect's temporary server, if already started for a run (soundpatch.entry)."""
    parser = _build_parser()
    command = None
    try:
        args = parser.parse_args(argv)
        command = getattr(args, "command", None)
        if not command:
            parser.print_help()
            return EXIT_NOTHING_RAN
        args.server = server
        return int(args.handler(args))
    except SoundpatchError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)  # one line, whatever the width
        return EXIT_NOTHING_RAN
    except KeyboardInterrupt:
        # Only a run has anything to resume (detect, validate and report write nothing until done).
        resume = " Run the same command with --run-id to resume where it stopped." if command == "run" else ""
        err.print(f"Interrupted.{resume}")
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="soundpatch",
        description="Batch audio inpainting: regions of recordings "
        "replaced from a manifest, with a budget cap and a cost report.",
    )
    parser.add_argument("--version", action="version", version=f"soundpatch {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    run = sub.add_parser("run", help="process a manifest")
    run.add_argument("manifest", help=MANIFEST_HELP)
    _common(run)
    run.add_argument("--run-id", help="name the run; the same id again resumes it")
    _limits_options(run)
    run.add_argument("--dry-run", action="store_true", help="validate and estimate; spend nothing")
    run.add_argument("--force", action="store_true", help="redo rows whose result already exists")
    _rows_option(run)
    run.add_argument("--verbose", action="store_true", help="show Prefect's own logs")
    run.set_defaults(handler=cmd_run)

    validate = sub.add_parser("validate", help="check rows and audio, print the cost estimate")
    validate.add_argument("manifest", help=MANIFEST_HELP)
    _common(validate)
    _limits_options(validate)  # (what the estimate is of: its cost, its time at the pace)
    _rows_option(validate)
    validate.set_defaults(handler=cmd_validate)

    sim = sub.add_parser("simulate", help="a local server speaking Each Labs', Stability AI's and fal's APIs ($0)")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8787)
    sim.add_argument("--latency", type=float, default=2.0, help="seconds per prediction")
    sim.add_argument("--rpm", type=float, help="creates per minute before answering 429")
    sim.add_argument("--rate-window", type=float, default=60.0, help="seconds --rpm is counted over (sliding)")
    sim.add_argument("--error-rate", type=float, default=0.0, help="share of creates answered 503")
    sim.add_argument("--fail-rate", type=float, default=0.0, help="share of predictions that fail")
    sim.add_argument("--truncate-rate", type=float, default=0.0, help="share of downloads cut short")
    sim.add_argument(
        "--corrupt-rate", type=float, default=0.0, help="share of downloads sent whole but damaged (all zeros)"
    )
    sim.add_argument("--filter-rate", type=float, default=0.0, help="Stability: share of results CONTENT_FILTERED")
    sim.add_argument("--flagged-word", help="Stability: prompts holding this word are refused (403 content_moderation)")
    sim.add_argument(
        "--timeout-after-429", type=float, default=60.0, help="Stability: seconds a key stays refused after a 429"
    )
    sim.add_argument("--format", choices=["wav", "mp3"], default="wav", help="result format")
    sim.add_argument("--shift-ms", type=float, default=0.0, help="misalign results by this much")
    sim.add_argument("--fill", choices=["local", "tone"], default="local", help="what the 'model' writes")
    sim.add_argument("--price", type=float, default=0.20, help="cost reported per prediction")
    sim.add_argument("--balance", type=float, help="the account's credit in USD; creates past it are refused (402)")
    sim.add_argument("--api-key", help="the only key accepted (default: any non-empty key)")
    sim.add_argument(
        "--keep-results", type=float, default=3600.0, help="seconds a result stays downloadable (memory stays bounded)"
    )
    sim.set_defaults(handler=cmd_simulate)

    detect = sub.add_parser(
        "detect", help="find dropouts (and clicks) in recordings and write the manifest that fills them (no cost)"
    )
    detect.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="files, folders (their recordings, at any depth), patterns (audio/*.wav), s3:// keys, or s3:// "
        "prefixes (s3://bucket/archive/)",
    )
    detect.add_argument(
        "-o",
        "--out",
        default="dropouts.csv",
        help="the manifest to write: a file (default: dropouts.csv) or an s3:// key",
    )
    detect.add_argument("--prompt", default=DETECT_PROMPT, help="the prompt of every row")
    detect.add_argument("--min-ms", type=float, default=5.0, help="shortest dropout to report (default: 5)")
    detect.add_argument(
        "--clicks", action="store_true", help="find clicks too: short bursts that stand out from the audio around them"
    )
    detect.add_argument(
        "--all-to-provider",
        action="store_true",
        help="with a hosted provider, send it every row (those within 1 s in all one row); by default rows of clicks "
        "and dropouts of up to 20 ms go to the local engine, which rebuilds their damaged samples alone, for $0",
    )
    _common(detect)
    detect.set_defaults(handler=cmd_detect)

    report = sub.add_parser("report", help="re-render a run's report from its journal")
    report.add_argument("run_id", nargs="?", help="the run (default: the latest in runs_dir)")
    _common(report)
    report.set_defaults(handler=cmd_report)

    runs = sub.add_parser("runs", help="list the runs in runs_dir: what each made and spent, and whether it finished")
    runs.add_argument(
        "--since",
        help="only runs begun on or after this day or time, UTC (2026-12-01, 2026-12-01T18:00, today, yesterday), "
        "or this long ago (7d, 12h)",
    )
    runs.add_argument("--json", action="store_true", help="print them as JSON, for scripts")
    _common(runs)
    runs.set_defaults(handler=cmd_runs)
    return parser


MANIFEST_HELP = "a CSV or YAML manifest: a file, or an s3:// or https:// one (its inputs named beside it)"


def _limits_options(parser: argparse.ArgumentParser) -> None:
    """The options `_OPTION_KEYS` sets config keys from."""
    parser.add_argument("--budget", type=float, help="hard cap in USD for this run (limits.budget_usd)")
    parser.add_argument("--rpm", type=float, help="creates per minute (limits.requests_per_minute)")
    parser.add_argument("--concurrency", type=int, help="predictions in flight (limits.concurrency)")
    parser.add_argument("--provider", help="provider for rows that do not name one (provider.name)")


def _rows_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rows",
        action="extend",  # `--rows a,b --rows 'c-*'`: ["a", "b", "c-*"]
        type=lambda given: [p.strip() for p in given.split(",") if p.strip()],
        default=[],
        metavar="IDS",
        help="only the rows with these ids (commas between; shell patterns such as 'glass-*'): a trial of a few",
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (default: embedded setup)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config key for this command, over the file's (output.uri=s3://bucket/x/); repeatable",
    )


# The config keys `soundpatch run` sets from its options: {key: (option, argparse's name)}.
_OPTION_KEYS = {
    "limits.budget_usd": ("--budget", "budget"),
    "limits.requests_per_minute": ("--rpm", "rpm"),
    "limits.concurrency": ("--concurrency", "concurrency"),
    "provider.name": ("--provider", "provider"),
}


def _config(args: argparse.Namespace) -> Config:
    flags = {key: f"Option {option} ({key})" for key, (option, _) in _OPTION_KEYS.items()}
    overrides: dict[str, object] = {}
    for setting in args.set:
        key, equals, value = setting.partition("=")
        key = key.strip()
        if not equals or not key:
            raise _UsageError(f"--set {setting} is not KEY=VALUE, as in --set limits.budget_usd=50.")
        overrides[key] = _setting_value(setting, value)
        flags[key] = f"--set {key}"  # (not its value, which may be a secret mistyped as a key)
    for key, (_, name) in _OPTION_KEYS.items():  # (what an option says goes over --set)
        if getattr(args, name, None) is not None:
            overrides[key] = getattr(args, name)
    return load_config(args.config, overrides, flags=flags)


def _setting_value(setting: str, text: str) -> object:
    """`--set`'s value as the config file would read it (50 a number, true a yes, a list in
    [...]); text YAML cannot read stays the text it is."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if value is None:
        raise _UsageError(f"--set {setting} gives no value; a key left out of the config takes its default.")
    return value


# ---------------------------------------------------------------------- validate / dry run


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _config(args)
    batch = Batch(read_manifest(args.manifest, cfg.storage), cfg, "validate", dry_run=True, rows=args.rows)
    est = batch.estimate(batch.manifest.edits)
    _print_estimate(est, cfg, made_up_run_id="validate")
    return EXIT_ROWS_FAILED if est["invalid"] else 0


# Counts of the estimate shown only when there are any: (key, what the line says).
ESTIMATE_COUNTS = (
    ("already_done", "already done (reused, no cost)"),
    ("duplicates", "identical to another row (sent once)"),
    ("twins", "other spans of another row's request (sent once)"),
    ("combined_files", "files holding several rows' edits"),
    ("to_collect", "paid earlier, to collect (no new cost)"),
    ("in_doubt", "in doubt from earlier (not sent again)"),
    ("changed", "changed since an earlier attempt (made anew)"),
)


def _print_estimate(est: dict[str, Any], cfg: Config, made_up_run_id: str | None = None) -> None:
    """`made_up_run_id`: the run id the estimate was made under, when the run's own is not known yet."""
    table = Table(show_header=False, box=None)
    table.add_row("manifest rows", str(est["rows"]))
    table.add_row("results (variations counted)", str(est["results"]))
    table.add_row("predictions to send", str(est["predictions"]))
    table.add_row("invalid", str(est["invalid"]))
    for key, said in ESTIMATE_COUNTS:
        if est.get(key):
            table.add_row(said, str(est[key]))
    spent = est.get("spent_before_usd", 0.0)
    earlier = f"; ${spent:.2f} spent by earlier attempts" if spent else ""
    table.add_row("expected cost", f"${est['expected_cost_usd']:.2f} (budget ${est['budget_usd']:.2f}{earlier})")
    table.add_row("expected wall time", duration(est["expected_seconds"]))
    if est.get("results_bytes"):
        free = est.get("outputs_free")
        where = f" ({human_size(free[1])} free in {free[0]})" if free else ""
        table.add_row("results on disk", f"up to {human_size(est['results_bytes'])}{where}")
    if est.get("first_output"):
        first = est["first_output"]
        if made_up_run_id:  # a new run's id is made when it starts
            first = "/".join("<run id>" if part == made_up_run_id else part for part in first.split("/"))
        more = est["result_files"] - 1
        shown = Text(first + (f" (and {more} more)" if more > 0 else ""), overflow="fold")  # whole, however narrow
        table.add_row("first result goes to", shown)  # (so a template is seen at work before any money is)
    # (rows naming their own provider: each's predictions to send)
    table.add_row("provider", counts_by_name(est.get("predictions_by_provider", {}), cfg.provider.name))
    out.print(table)
    for row_id, line, reason in est["errors"][:20]:
        out.print(f"  [red]invalid[/red] {escape(row_id)} ({line}): {escape(reason)}", soft_wrap=True)
    if len(est["errors"]) > 20:
        out.print(f"  ... and {len(est['errors']) - 20} more invalid rows")
    for note in est.get("notes", []):
        out.print(f"[yellow]note: {escape(note)}[/yellow]", soft_wrap=True)
    if est["expected_cost_usd"] + spent > est["budget_usd"] + 1e-9:
        fit, predictions = est["within_budget"], plural(est["predictions"], "prediction")
        out.print(
            f"[yellow]The expected cost is above the budget: about {fit} of {predictions} fit in it, "
            "the rest will be skipped_budget (--budget or limits.budget_usd raises it).[/yellow]",
            soft_wrap=True,
        )


# ---------------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    manifest = read_manifest(args.manifest, cfg.storage)  # fail fast (exit 2) before starting Prefect
    if args.dry_run:
        # With --run-id, what resuming that run costs (what its earlier attempts paid counts).
        run_id = args.run_id or "dry-run"
        batch = Batch(manifest, cfg, run_id, dry_run=True, earlier_attempts=bool(args.run_id), rows=args.rows)
        est = batch.estimate(batch.manifest.edits)
        out.print("[bold]Dry run[/bold]: nothing is sent and nothing is spent.")
        _print_estimate(est, cfg, made_up_run_id=None if args.run_id else "dry-run")
        return EXIT_ROWS_FAILED if est["invalid"] else 0
    preflight(cfg)  # no key, no staging: one sentence now, not a failed flow later
    # The rows as the run has them, input patterns listed (`take-music`; listed again as the run
    # starts): their count, and an id of --rows no row has stopping the command now (exit 2), not
    # once Prefect has started.
    manifest = manifest.with_patterns_expanded(SourceReader(S3(cfg.storage.s3), cfg.storage, cache_bytes=0).glob)
    if args.rows:
        manifest = manifest.only(args.rows)
    run_id = args.run_id or new_run_id()
    if args.run_id and not _safe_run_id(run_id):
        raise SoundpatchError(f"Run id {run_id!r} may only hold letters, digits, '.', '_' and '-'.")
    run_dir = Path(cfg.runs_dir).expanduser() / run_id
    try:
        run_lock = RunLock(run_dir).acquire()  # another process on this run: refused now, not after Prefect starts
    except OSError as exc:
        raise SoundpatchError(f"Nothing was sent: {_unwritable(run_dir, exc)}") from None
    try:
        return _run(args, cfg, manifest, run_id, run_dir)
    finally:
        run_lock.release()


def _run(args: argparse.Namespace, cfg: Config, manifest: Manifest, run_id: str, run_dir: Path) -> int:
    shown = escape(shown_input(str(args.manifest)))
    out.print(f"run id [bold]{run_id}[/bold]  ({plural(len(manifest.edits), 'result')} from {shown})")

    from flows.ephemeral import TemporaryServer, quiet_prefect  # noqa: PLC0415 - Prefect loads only from here on

    quiet_prefect(args.verbose)
    # Prefect's temporary server takes seconds to start: it was started as the command
    # began (soundpatch.entry) or starts now, while Prefect and the flow load here, and is
    # awaited when the flow begins (and stopped at once if Prefect's settings turn out to
    # name a server of the user's).
    server = args.server or TemporaryServer.unless_configured(show_output=args.verbose)
    try:
        # The rows need scipy.signal (alignment, loudness, the local engine), which `validate`
        # does not: it loads here, on the other core while Prefect's server starts, not in
        # the first row (whose result came a second and more after the next rows were sent).
        import scipy.signal  # noqa: F401, PLC0415

        if "local" in {cfg.provider.name, *(edit.provider for edit in manifest.edits)}:
            # The local engine's compiled solver likewise (soundpatch/engine/toeplitz.py: 1 s).
            from soundpatch.engine.toeplitz import prepare  # noqa: PLC0415

            prepare()
        from flows.ephemeral import api_configured, configured_server_away, isolated_api  # noqa: PLC0415
        from flows.inpaint_batch import inpaint_batch  # noqa: PLC0415
        from flows.prefect_messages import condense_prefect_messages  # noqa: PLC0415
        from flows.shared_limits import check_server  # noqa: PLC0415

        check_server(cfg)
        away = configured_server_away()
        if away is not None:  # (the flow's first call to it failed the run as "stopped unexpectedly")
            raise SoundpatchError(
                f"Prefect's server at {away[0]} (PREFECT_API_URL) does not answer ({away[1]}); start it, or unset "
                "PREFECT_API_URL to run on a temporary server of the run's own. Nothing was sent."
            )
        if not args.verbose:
            condense_prefect_messages()  # its logging is set up by now (importing the flow did it)
    except BaseException:
        if server is not None:
            server.stop()
        raise

    _stop_on_signals(run_id)
    # A first run sets up the temporary server's database; a server of the user's (named
    # where only Prefect's own settings see it) already has one, and the temporary is stopped.
    first = server is not None and server.new_database and not api_configured()
    watcher = ProgressWatcher(
        run_dir, total=len(manifest.edits), budget=cfg.limits.budget_usd, new_database=first, console=err
    )
    watcher.start()
    began = time.time()
    try:
        with isolated_api(server):
            # Failed when rows did not succeed (what Prefect's UI shows); the exit status below
            # says the same in the command's terms.
            state = inpaint_batch(
                manifest=str(args.manifest),
                config=cfg.model_dump(),
                run_id=run_id,
                force=args.force,
                rows=args.rows,
                return_state=True,
            )
            result = state.result(raise_on_failure=False)
            if isinstance(result, BaseException):  # the flow itself failed
                raise result
    except SoundpatchError:
        raise
    except Exception as exc:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "errors.log", "a", encoding="utf-8") as f:
                f.write(traceback.format_exc())
        except OSError as unwritable:
            raise SoundpatchError(
                f"The run stopped unexpectedly ({type(exc).__name__}: {str(exc)[:200]}) and "
                f"{_unwritable(run_dir, unwritable)}"
            ) from None
        result = _finished_anyway(run_dir, began)
        if result is None:
            raise SoundpatchError(
                f"The run stopped unexpectedly ({type(exc).__name__}: {str(exc)[:200]}); details are in "
                f"{run_dir / 'errors.log'}, and the same command with --run-id {run_id} resumes it."
            ) from None
        err.print(
            f"Prefect could not record how the flow run ended ({type(exc).__name__}: {str(exc)[:200]}; details in "
            f"{run_dir / 'errors.log'}); the run itself finished and its report is written.",
            soft_wrap=True,
            markup=False,
        )
    finally:
        watcher.stop()
    outcomes = [Outcome.from_dict(r) for r in result["rows"]]
    _print_summary(result["summary"], outcomes, run_dir)
    if interrupt.stop_requested():
        err.print(f"Interrupted. Run the same command with --run-id {run_id} to finish the rest.", soft_wrap=True)
        return EXIT_INTERRUPTED
    # The rows it ran: the report also holds the rows of the run --rows left out, as they were.
    ran = set(result.get("ran", [o.row_id for o in outcomes]))
    return exit_status([o for o in outcomes if o.row_id in ran])


def _unwritable(run_dir: Path, exc: OSError) -> str:
    """What to do about a run folder that cannot be written (its disk full, say)."""
    full = full_disk(run_dir, exc)
    if full is not None:
        return f"{full}; free some space (or set runs_dir to a larger disk) and run it again."
    return (
        f"the run's folder {run_dir} cannot be written ({exc.strerror or exc}); "
        "set runs_dir to a folder you can write to and run it again."
    )


def _stop_on_signals(run_id: str) -> None:
    """First Ctrl-C/SIGTERM: no new rows, in-flight ones end. Second: stop at once."""
    signals = 0

    def handler(signum: int, frame: Any) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            interrupt.request_stop()
            err.print(
                "Stopping: no new rows will start; those in flight are finishing "
                f"(press Ctrl-C again to stop at once; --run-id {run_id} resumes).",
                soft_wrap=True,
            )
            return
        err.print(f"Stopped at once. Run the same command with --run-id {run_id} to resume.", soft_wrap=True)
        os._exit(EXIT_INTERRUPTED)

    interrupt.install(handler)


def _safe_run_id(run_id: str) -> bool:
    return (
        bool(run_id)
        and len(run_id) <= 128
        and all(c.isalnum() or c in "._-" for c in run_id)
        and run_id not in (".", "..")
    )


def _finished_anyway(run_dir: Path, began: float) -> dict[str, Any] | None:
    """The run's result when its flow finished and wrote the report, and only Prefect's own
    bookkeeping after it failed (its server away when the flow run's end was recorded)."""
    report = run_dir / "report.json"
    try:
        if report.stat().st_mtime < began:
            return None  # an earlier attempt's
        result = json.loads(report.read_bytes())
        return result if {"rows", "summary"} <= set(result) else None
    except (OSError, ValueError, TypeError):
        return None


def _print_summary(summary: dict[str, Any], outcomes: list[Outcome], run_dir: Path) -> None:
    counts = Counter(o.status for o in outcomes)
    table = Table(title=f"soundpatch run {summary['run_id']}", show_header=False, title_justify="left")
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # a long path wraps whole (in a log, 80 columns), never cut short
    for status in STATUSES:
        if counts.get(status):
            style = {"succeeded": "green", "failed": "red", "invalid": "red"}.get(status, "yellow")
            table.add_row(f"[{style}]{status}[/{style}]", str(counts[status]))
    table.add_row("spent", f"${summary['spent_usd']:.2f} of ${summary['budget_usd']:.2f} budget")
    if summary.get("provider_cost_usd", 0) != summary["spent_usd"]:
        table.add_row("provider reported", f"${summary.get('provider_cost_usd', 0):.2f}")
    if summary.get("flagged"):
        table.add_row("[yellow]flagged by checks[/yellow]", f"{summary['flagged']} (see the report)")
    if summary.get("wall_seconds") is not None:  # (unknown for a run that ended before its report)
        table.add_row("wall time", duration(summary["wall_seconds"]))
    table.add_row("outputs", str(summary.get("output_uri", "")))
    if summary.get("index_uri"):
        table.add_row("dataset index", str(summary["index_uri"]))
    missing = summary.get("report_missing")  # its disk was full: a note says so
    table.add_row("report", "not written (see the note below)" if missing else str(run_dir / "report.html"))
    if summary.get("report_uri"):
        table.add_row("report in bucket", str(summary["report_uri"]))
    out.print(table)
    # Rows that did not succeed, those with the same reason on one line: the eight most
    # common reasons, the rest in the report.
    reasons = by_reason(outcomes)
    for status, error, rows in reasons[:8]:
        out.print(f"  [red]{status}[/red] {escape(some_rows(rows))}: {escape(error)}", soft_wrap=True)
    if len(reasons) > 8:
        unshown = sum(len(rows) for _, _, rows in reasons[8:])
        out.print(f"  ... {plural(unshown, 'more row')} in {run_dir / 'report.csv'}", soft_wrap=True)
    for note in summary.get("notes", []):
        out.print(f"[dim]note: {escape(note)}[/dim]", soft_wrap=True)
    for step in _next_steps(summary):
        out.print(f"[yellow]{escape(step)}[/yellow]", soft_wrap=True)


def _next_steps(summary: dict[str, Any]) -> list[str]:
    """The commands that finish a run: what its flow (or rendering again) counted
    (summary.to_finish, outcome.to_finish)."""
    manifest = shlex.quote(summary["manifest"]) if summary.get("manifest") else "its manifest"
    again = f"soundpatch run {manifest} with the options it had"
    run_id = summary.get("run_id", "")
    return ToFinish.of(summary).sentences(
        f"{again} and --run-id {run_id}", lambda budget: f"{again}, --run-id {run_id} and --budget {budget:.2f}"
    )


# ---------------------------------------------------------------------- detect

DETECT_PROMPT = "the same sound as around it, continuing seamlessly"
# Recordings read and searched at once: a second overlaps one's decoding and numpy work
# with the other's Python (1.5 times as fast on 2 cores); each more holds one more
# recording in memory (0.7 GB for 30 minutes of stereo) for less and less.
DETECT_AT_ONCE = 2


def cmd_detect(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.min_ms <= 0:
        raise SoundpatchError("--min-ms must be more than 0.")
    s3 = S3(cfg.storage.s3)
    if args.out.startswith(("http://", "https://")):
        raise SoundpatchError(f"--out {args.out}: the manifest goes to a file or an s3:// key, not to a web server.")
    in_bucket = S3Uri.parse(args.out) if args.out.startswith("s3://") else None
    if in_bucket is not None:  # before the archive is read through, not after
        s3.check_bucket(in_bucket, "--out")
    reader = SourceReader(s3, cfg.storage, cache_bytes=0)  # one recording at a time
    named: dict[str, None] = {}  # in the order given, each once
    folders = [given for given in args.inputs if not GLOB_CHARS.search(given) and reader.is_folder(given)]
    for given in args.inputs:
        if given in folders:  # an archive's folder: its recordings, at every depth
            named.update(dict.fromkeys(reader.recordings_in(given)))
        else:
            named.update(dict.fromkeys(reader.glob(given) if GLOB_CHARS.search(given) else [given]))
    sources = list(named)
    if not sources:
        searched = f" (in a folder, its {'/'.join(sorted(RECORDING_SUFFIXES))} files at any depth)" if folders else ""
        raise SoundpatchError(f"No files match {', '.join(args.inputs)}{searched}.")
    found, unreadable = [], []
    kinds = ("dropouts", "clicks") if args.clicks else ("dropouts",)  # as Damage.kind, plural
    title = " and ".join(kinds).capitalize() + " found"
    table = Table("recording", *kinds, "seconds", title=title, title_justify="left")

    def damage_in(source: str) -> list[Damage] | RowError:
        try:
            audio = reader.audio(source)
            damage = find_dropouts(audio, min_seconds=args.min_ms / 1000)
            return damage + find_clicks(audio) if args.clicks else damage
        except RowError as exc:
            return exc

    pool = ThreadPoolExecutor(DETECT_AT_ONCE, thread_name_prefix="detect")
    try:
        with err.status(f"reading {plural(len(sources), 'recording')}") as status:  # (on a terminal only)
            for number, (source, damage) in enumerate(zip(sources, pool.map(damage_in, sources), strict=True), 1):
                status.update(f"read {number} of {len(sources)}: {escape(source)}")
                if isinstance(damage, RowError):
                    unreadable.append(as_sentence(str(damage)))
                    continue
                found.extend((source, d) for d in damage)
                if damage and table.row_count < 20:
                    counts = Counter(f"{d.kind}s" for d in damage)
                    table.add_row(
                        escape(source),
                        *(str(counts[kind]) for kind in kinds),
                        f"{sum(d.end - d.start for d in damage):.3f}",
                    )
    finally:  # (stopped, what has not begun is not begun)
        pool.shutdown(cancel_futures=True)
    recordings = len({source for source, _ in found})
    if table.row_count:
        out.print(table)
        if recordings > table.row_count:
            out.print(f"  ... and {recordings - table.row_count} more recordings with {' or '.join(kinds)}")
    for line in unreadable:
        err.print(f"[red]not read:[/red] {escape(line)}", soft_wrap=True)
    if not found:
        out.print(f"No {' or '.join(kinds)} found in {len(sources) - len(unreadable)} recordings; nothing written.")
        return EXIT_ROWS_FAILED if unreadable else 0
    target = Path(args.out)  # (a local one)
    written = args.out if in_bucket is not None else str(target)
    margin = cfg.splice.crossfade_ms / 1000
    # The local engine rebuilds a row's clicks and short dropouts alone, for nothing, and closer
    # to what was there than a model making the whole region anew: with a hosted provider in the
    # config, those rows name it (unless --all-to-provider). Crackle is then a few rows a minute.
    # The model's rows within a second are one prediction's.
    hosted = cfg.provider.name not in MENDING_DAMAGED
    mender = MENDING_DAMAGED[0] if hosted and not args.all_to_provider else ""
    join = not hosted or bool(mender)
    # Local inputs are named relative to a local manifest's folder; in a bucket's, as they are here.
    folder = str(target.resolve().parent) if in_bucket is None else None
    text = restoration_manifest(found, folder, args.prompt, margin, join, mender, hosted)
    if in_bucket is not None:
        try:
            s3.write(in_bucket, text.encode("utf-8"), "text/csv; charset=utf-8")
        except RowError as exc:
            raise SoundpatchError(f"The manifest was not written: {str(exc).rstrip('.')}.") from None
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    config = f" --config {args.config}" if args.config else ""
    config += "".join(f" --set {setting}" for setting in args.set)
    rows, span_rows, span_rows_apart, among = row_counts(found, margin, join, hosted)  # what meets is one row
    apart, apart_span_rows, _, _ = row_counts(found, margin)  # none joined but what meets
    joined_spans = (span_rows, span_rows_apart) if mender else (rows, apart)
    if join and joined_spans[1] > joined_spans[0]:
        out.print(
            f"Clicks and dropouts of up to {1000 * MAX_DAMAGED_SECONDS:g} ms less than {JOIN_SPANS_SECONDS:g} s "
            f"apart are one row, of up to {ROW_OF_SPANS_SECONDS:g} s ({plural(joined_spans[0], 'row')} where apart "
            f"they would be {joined_spans[1]}): the local engine rebuilds them alone."
            + ("" if hosted else " For a hosted provider, detect with its config: its model makes a region whole."),
            soft_wrap=True,
        )
    model_rows = (rows - span_rows, apart - apart_span_rows) if mender else (rows, apart)
    if hosted and model_rows[1] > model_rows[0]:
        what = f"Dropouts of over {1000 * MAX_DAMAGED_SECONDS:g} ms" if mender else "Clicks and dropouts"
        out.print(
            f"{what} within {ROW_FOR_A_MODEL_SECONDS:g} s in all are one row for {cfg.provider.name}, which "
            f"generates a second at the least whatever the row: its audio goes into each of them and "
            f"{cfg.splice.crossfade_ms:g} ms around it ({plural(model_rows[0], 'row')} where apart they would be "
            f"{model_rows[1]})."
            + (
                f" {among} {'click or short dropout' if among == 1 else 'clicks and short dropouts'} among them "
                f"{'goes' if among == 1 else 'go'} to {cfg.provider.name} in the same prediction: a row of the local "
                "engine's between two of them would keep those apart."
                if mender and among
                else ""
            ),
            soft_wrap=True,
        )
    if mender and span_rows:
        name, others = cfg.provider.name, rows - span_rows
        out.print(
            f"{plural(span_rows, 'row')} of clicks and short dropouts name the local engine in their provider column: "
            f"it rebuilds their damaged samples alone, for $0, where {name} would make each whole region anew, "
            f"at ${cfg.provider.price:.2f} a row. {plural(others, 'row')} {'goes' if others == 1 else 'go'} to "
            f"{name} (--all-to-provider sends it every row).",
            soft_wrap=True,
        )
    if args.all_to_provider and not hosted:
        out.print(
            "[yellow]note: --all-to-provider changes nothing here: the config's provider is the local engine, "
            "which is given every row anyway; give the config of a hosted provider to send it every row.[/yellow]",
            soft_wrap=True,
        )
    out.print(
        f"Wrote {plural(rows, 'row')} ({plural(recordings, 'recording')} of {len(sources)}) to {written}. "
        f"What filling them costs: soundpatch validate {written}{config}",
        soft_wrap=True,
    )
    return EXIT_ROWS_FAILED if unreadable else 0


# ---------------------------------------------------------------------- simulate


def cmd_simulate(args: argparse.Namespace) -> int:
    from soundpatch.simulator import Simulator, SimulatorSettings

    settings = SimulatorSettings(
        latency=args.latency,
        rpm=args.rpm,
        rate_window=args.rate_window,
        error_rate=args.error_rate,
        fail_rate=args.fail_rate,
        truncate_rate=args.truncate_rate,
        corrupt_rate=args.corrupt_rate,
        filter_rate=args.filter_rate,
        flagged_word=args.flagged_word,
        timeout_after_429=args.timeout_after_429,
        result_format=args.format,
        shift_ms=args.shift_ms,
        fill=args.fill,
        price=args.price,
        balance=args.balance,
        api_key=args.api_key,
        keep_results=args.keep_results,
    )
    try:
        sim = Simulator(settings, host=args.host, port=args.port)
    except OSError as exc:
        raise SoundpatchError(f"Cannot listen on {args.host}:{args.port}: {exc.strerror}.") from None
    out.print(f"Simulating Each Labs, Stability AI and fal at [bold]{sim.base_url}[/bold] (Ctrl-C stops it).")
    out.print("Point a config at it:")
    out.print(f"  provider: {{name: stability, base_url: {sim.base_url}}}")
    out.print(f"  provider: {{name: eachlabs, base_url: {sim.base_url}}}   (with storage.staging)")
    out.print(f"  provider: {{name: fal, base_url: {sim.base_url}}}        (with storage.staging)")
    value = "the key it was given" if args.api_key else "any value"
    out.print(f"and set STABILITY_API_KEY, EACHLABS_API_KEY or FAL_KEY to {value}.")
    try:
        sim.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        sim.server.server_close()
    s = sim.stats
    out.print(f"Served {s.accepted} predictions ({s.rate_limited} rate-limited, {s.server_errors} 5xx).")
    return 0


# ---------------------------------------------------------------------- report


def cmd_report(args: argparse.Namespace) -> int:
    cfg = _config(args)
    s3 = S3(cfg.storage.s3)
    if args.run_id is None:
        latest = latest_runs(Path(cfg.runs_dir).expanduser())
        if not latest:
            raise SoundpatchError(f"No run in {Path(cfg.runs_dir)} to report on.")
        args.run_id = latest[0]
        out.print(f"Run {args.run_id}, the latest in {Path(cfg.runs_dir)}.", soft_wrap=True)
    run_dir = Path(cfg.runs_dir).expanduser() / args.run_id
    outcomes, summary = rerender(args.run_id, run_dir, cfg, s3, say=lambda text: out.print(text, soft_wrap=True))
    _print_summary(summary, outcomes, run_dir)
    return exit_status(outcomes)


def cmd_runs(args: argparse.Namespace) -> int:
    cfg = _config(args)
    since, after = _since(args.since) if args.since else (None, "")
    in_bucket = cfg.output.uri.startswith("s3://")
    try:
        runs = past_runs(Path(cfg.runs_dir).expanduser(), cfg, since, S3(cfg.storage.s3) if in_bucket else None)
    except RowError as exc:
        raise SoundpatchError(
            f"The runs' journals in {cfg.output.uri} could not be read: {str(exc).rstrip('.')}."
        ) from None
    if args.json:
        print(json.dumps([run.as_dict() for run in runs], indent=2))
        return 0
    where = f"{Path(cfg.runs_dir)}" + (f" and {cfg.output.uri}" if in_bucket else "")
    if not runs:
        out.print(f"No runs in {where}{after}.", soft_wrap=True)
        return 0
    out.print(f"Runs in {where}{after}, the latest first:", soft_wrap=True)
    width = max(len(run.run_id) for run in runs)
    for run in runs:
        counts = [f"{run.by_status[s]} {s}" for s in STATUSES if run.by_status[s]]
        if run.not_done:
            counts.append(f"{run.not_done} not done")
        state = {"going": "[yellow]going[/yellow]", "finished": "[green]finished[/green]"}.get(run.state)
        if state is None:
            state = "[red]stopped[/red]" + (f" (about ${run.out.price_usd:.2f} out)" if run.out.rows else "")
        began = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(run.started))
        spent = f"${run.spent_usd:.2f}"
        out.print(
            f"  {run.run_id:<{width}}  {began}  {spent:>8}  {state}: {', '.join(counts) or 'no results'}",
            soft_wrap=True,
        )
        elsewhere = "made on another machine: its journal's copy in the bucket" if run.elsewhere else ""
        what = ", ".join(filter(None, (escape(run.manifest), ", ".join(run.providers), elsewhere)))
        out.print(f"  {'':<{width}}  [dim]{what}[/dim]", soft_wrap=True)
    out.print(f"{plural(len(runs), 'run')}: ${sum(r.spent_usd for r in runs):.2f} spent.", soft_wrap=True)
    for run in runs:
        if run.state == "stopped" and run.out.rows:
            out.print(
                f"[dim]note: Run {run.run_id} stopped with {plural(run.out.rows, 'prediction')} paid for (or maybe "
                f"paid for) and not collected, about ${run.out.price_usd:.2f} not in its spent: soundpatch run "
                f"{escape(run.manifest) or 'its manifest'} with the options it had and --run-id {run.run_id} collects "
                "them at no new cost.[/dim]",
                soft_wrap=True,
            )
    return 0


SINCE_BACK = r"(\d+(?:\.\d+)?)\s*([wdhm])"  # `--since 7d`: a time back from now
SINCE_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60}  # seconds in each of its units


def _since(text: str, now: float | None = None) -> tuple[float, str]:
    """`--since` as seconds since the epoch, and the words that say it (" begun in the last
    7d"): a day, or a day and time, in UTC (2026-12-01, 2026-12-01T18:00); `today` or
    `yesterday` (from midnight, UTC); or a time back from now (`7d`, `12h`, `30m`, `2w`)."""
    now = time.time() if now is None else now
    said = text.strip().lower()
    since = f" begun since {text.strip()}"
    midnight = datetime.datetime.fromtimestamp(now, datetime.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if said in ("today", "yesterday"):
        return (midnight - datetime.timedelta(days=1 if said == "yesterday" else 0)).timestamp(), since
    back = re.fullmatch(SINCE_BACK, said)
    if back:
        return now - float(back.group(1)) * SINCE_UNITS[back.group(2)], f" begun in the last {text.strip()}"
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise _UsageError(
            f"--since {text} is not a day or time, as in --since 2026-12-01, 2026-12-01T18:00, today, yesterday, "
            "or a time back from now: 7d, 12h, 30m."
        ) from None
    return when.replace(tzinfo=when.tzinfo or datetime.UTC).timestamp(), since


if __name__ == "__main__":
    sys.exit(main())
