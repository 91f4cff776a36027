"""The batch pipeline, top to bottom.

1. Read the manifest and the config (the same ones `soundpatch validate` checks).
2. Keep the rows this run already finished (running again with the same run id resumes).
3. Fan out one `inpaint-row` task per remaining result, at most twice
   `limits.concurrency` at once (predictions in flight are held to `limits.concurrency`
   by the provider; the other rows prepare or finish), so memory stays flat however
   long the manifest.
   Asked to stop (Ctrl-C, SIGTERM), or once the run's journal cannot be written (its disk
   filled up), it starts no more rows and lets those in flight end.
4. Write the report (runs/<run_id>/report.csv, .json, .html; also under
   <output.uri>/<run_id>/ when the outputs are in a bucket), show it on the flow run as
   Prefect artifacts (progress while it goes, then outcomes and money), and return the
   summary. While it goes, the progress line is in the flow run's log too, once a minute
   and as the rows end (for a deployment's run, which no terminal shows). The flow run
   ends Completed when every result is there, and Failed, saying how many and why, when
   rows failed, were invalid or were stopped by the budget: what the command's exit status
   says, the Prefect UI and its automations see too (a nightly deployment that lost rows
   alerts instead of looking fine).

Parameters are plain values so the flow runs the same from the CLI, a deployment
schedule, or a worker (deploy/prefect.yaml). `config` is the config as a mapping (what
the CLI passes) or a config file's path (what a deployment names); `overrides`, dotted
keys over it ({"limits.budget_usd": 50}), are what a run of a deployment changes for
itself (the UI's custom run, `prefect deployment run --param`) without a file of its own.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from flows import artifacts
from flows.shared_limits import AccountLimits, shared_limits
from soundpatch import interrupt, web
from soundpatch.batch import Batch
from soundpatch.config import Config, config_from, load_config
from soundpatch.errors import ConfigError
from soundpatch.journal import prediction_seconds, read_events
from soundpatch.manifest_source import read_manifest
from soundpatch.outcome import EXIT_OK, SKIPPED_DONE, SUCCEEDED, Outcome, exit_status, to_finish
from soundpatch.progress import ProgressWatcher
from soundpatch.report import publish_reports, summarize
from tasks.inpaint import inpaint_row

LOGGED_EVERY_SECONDS = 60.0  # the progress line in a flow run's log (a nightly run of hours: 60 lines an hour)


def _progress_log(batch: Batch, total: int, budget: float) -> ProgressWatcher | None:
    """The progress line in the flow run's log (rows done, failed, spent, in flight, time
    left) every LOGGED_EVERY_SECONDS and as the rows end, for a run no terminal shows: a
    deployment's, on a worker, whose log the Prefect UI shows. None where that log takes
    no INFO: the `soundpatch` command (flows/ephemeral.py) shows its own line."""
    logger = get_run_logger()
    if not logger.isEnabledFor(logging.INFO):
        return None
    watcher = ProgressWatcher(batch.run_dir, total=total, budget=budget, say=logger.info, every=LOGGED_EVERY_SECONDS)
    watcher.start()  # (before the run's run_started, which it waits for to say anything)
    return watcher


def _flow_run_name() -> str:
    return f"soundpatch {flow_run.parameters.get('run_id') or _run_id_of_this_flow_run()}"


def _run_id_of_this_flow_run() -> str:
    """The run id of a flow run started without one (a schedule, a worker): made from the
    flow run's id, so that a retry of the same flow run (after a crashed worker, or from
    the UI) resumes its journal and collects its predictions instead of paying again."""
    scheduled = flow_run.scheduled_start_time
    return f"{scheduled.strftime('%Y%m%d-%H%M%S')}-{str(flow_run.id)[:8]}"


@flow(name="inpaint_batch", flow_run_name=_flow_run_name, task_runner=ThreadPoolTaskRunner())
def inpaint_batch(
    manifest: str,
    config: dict[str, Any] | str | None = None,
    run_id: str | None = None,
    force: bool = False,
    overrides: dict[str, Any] | None = None,
    rows: list[str] | None = None,
) -> dict[str, Any] | State:
    started = time.time()
    interrupt.reassert()  # Ctrl-C / SIGTERM: stop submitting, finish what is in flight
    if isinstance(config, str):
        cfg = load_config(config, overrides)
    else:
        cfg = config_from(config or {}, overrides) if overrides else Config.model_validate(config or {})
    run_id = run_id or _run_id_of_this_flow_run()
    shared = shared_limits(cfg)  # other processes on the same account, through the Prefect server
    batch = Batch(
        read_manifest(manifest, cfg.storage),
        cfg,
        run_id,
        force=force,
        api_keys=_api_keys(cfg),
        shared=shared,
        rows=rows or (),
    )
    logged = None
    try:
        todo, kept = batch.split()
        by_provider = batch.rows_by_provider(todo)  # for the time left (pace.py)
        # Each provider's, for the time left (pace.py).
        limits = {"concurrency": cfg.limits.concurrency, "per_minute": cfg.limits.requests_per_minute}
        logged = _progress_log(batch, len(todo) + len(kept), cfg.limits.budget_usd)
        batch.journal.write(
            "run_started",
            total=len(todo) + len(kept),
            kept=len(kept),
            manifest=web.shown_input(manifest),  # (a URL's query may hold a token)
            providers=by_provider,
            limits=limits,
        )
        shown = artifacts.RunArtifacts(len(todo) + len(kept), run_id, cfg.limits.budget_usd)  # in the Prefect UI
        shown.advance(kept)
        outcomes = kept + _fan_out(batch, todo, batch.rows_at_once, shown)
        batch.combine(outcomes)  # the files several rows of one recording share
        batch.add_to_index(outcomes)  # output.index: the dataset's CSV
    finally:
        if logged is not None:
            logged.stop()  # (its last line: the rows' outcomes and what they spent)
        batch.close()
    ran = outcomes  # (what the exit status, the flow run's state and what to finish go by)
    outcomes = ran + batch.left_out  # the run's report: with the rows --rows left out, as they were
    order = {row_id: i for i, row_id in enumerate(batch.row_order)}
    outcomes.sort(key=lambda o: order.get(o.row_id, len(order)))
    summary = summarize(
        outcomes,
        {
            "run_id": run_id,
            "manifest": web.shown_input(manifest),
            "provider": cfg.provider.name,
            "budget_usd": cfg.limits.budget_usd,
            "output_uri": cfg.output.uri,
            **({"index_uri": batch.index_uri} if batch.index_uri else {}),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "wall_seconds": round(time.time() - started, 3),
            "notes": batch.notes(),
            **_shared_waits(shared),
        },
        prediction_seconds(read_events(batch.run_dir)),
    )
    # The same command again finishes the rows it ran; the budget counts the whole run's spent.
    finish = to_finish(ran, summary["spent_usd"], cfg.provider.price_of)
    summary["to_finish"] = asdict(finish)  # (report.json, report.html)
    paths = publish_reports(batch.run_dir, outcomes, summary, batch.store)
    report = None if summary.get("report_missing") else str(paths["html"])  # None: its disk was full
    shown.publish(outcomes, summary, report or "not written (see the summary's notes)", finish)
    result = {"summary": summary, "rows": [o.to_dict() for o in outcomes], "ran": [o.row_id for o in ran]}
    if exit_status(ran) == EXIT_OK:
        return result
    return Failed(message=_what_went_wrong(ran, report), data=result)


def _what_went_wrong(outcomes: list[Outcome], report: str | None) -> str:
    """One sentence for the flow run's state: how many results are missing, and why."""
    missing = Counter(o.status for o in outcomes if o.status not in (SUCCEEDED, SKIPPED_DONE))
    parts = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in sorted(missing.items()))
    where = f"the report is at {report}" if report else "the report could not be written (the summary's notes say why)"
    return f"{sum(missing.values())} of {len(outcomes)} results are missing ({parts}); {where}"


def _shared_waits(shared: AccountLimits | None) -> dict[str, Any]:
    """How long creates waited for the shared rate limit (its acquisition latency included)."""
    waits = sorted(shared.create_waits) if shared is not None else []
    if not waits:
        return {}
    return {
        "shared_create_wait_p50_seconds": round(waits[len(waits) // 2], 3),
        "shared_create_wait_p95_seconds": round(waits[min(len(waits) - 1, int(len(waits) * 0.95))], 3),
    }


def _api_keys(cfg: Config) -> dict[str, str]:
    """A provider key kept in a Prefect Secret block (provider.api_key_secret), if any."""
    if not cfg.provider.api_key_secret:
        return {}
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(cfg.provider.api_key_secret).get()
    except ValueError:
        raise ConfigError(
            f"There is no Prefect Secret block named {cfg.provider.api_key_secret!r} "
            "(provider.api_key_secret); create it or set the key's environment variable."
        ) from None
    return {cfg.provider.name: str(value)}


def _fan_out(batch: Batch, edits: list, window: int, shown: artifacts.RunArtifacts) -> list[Outcome]:
    """Submit tasks through a sliding window of `window` futures."""
    outcomes: list[Outcome] = []
    running: list[PrefectFuture[Outcome]] = []
    for i, edit in enumerate(edits):
        if len(running) >= window:
            outcomes.append(_next_done(running))
            shown.advance(outcomes[-1:])
        if batch.stopping:  # asked to stop, or the journal cannot be written (a full disk)
            left = [batch.not_started(e) for e in edits[i:]]
            outcomes.extend(left)
            shown.advance(left)
            break
        running.append(inpaint_row.submit(batch, edit))
    while running:
        outcomes.append(_next_done(running))
        shown.advance(outcomes[-1:])
    return outcomes


def _next_done(in_flight: list[PrefectFuture[Outcome]]) -> Outcome:
    future = next(as_completed(in_flight))
    in_flight.remove(future)
    outcome = future.result()
    _forget_result_links()
    return outcome


def _forget_result_links() -> None:
    """Prefect links every task's result, and each field of it, to the task run's state for
    as long as the flow runs, in case the flow passes that result on to another task: about
    5 KB a row. Rows' results are never passed on, so the links are dropped as the results
    come in, and the memory of a run stays flat however long its manifest."""
    links = getattr(FlowRunContext.get(), "run_results", None)
    if isinstance(links, dict):
        links.clear()
