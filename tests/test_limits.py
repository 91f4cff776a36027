"""The budget ledger and the shared rate limiter."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import numpy as np
import pytest
import soundfile as sf

from soundpatch import config as config_module
from soundpatch import cpu, preview, splicing
from soundpatch import estimate as estimate_module
from soundpatch.batch import Batch
from soundpatch.config import load_config
from soundpatch.journal import Journal, read_events
from soundpatch.limits import BudgetLedger, RateLimiter
from soundpatch.manifest import load_manifest
from soundpatch.providers import hosted
from soundpatch.providers.reach import Reach
from tests.jobs import hosted_config, wait_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def test_the_ledger_never_lets_reservations_cross_the_cap_under_contention():
    ledger = BudgetLedger(10.0)

    def grab(_: int) -> bool:
        held = ledger.reserve(0.20)
        if held is None:
            return False
        ledger.settle(held, 0.20)
        return True

    with ThreadPoolExecutor(32) as pool:
        granted = sum(pool.map(grab, range(500)))
    assert granted == 50 and ledger.spent_usd == pytest.approx(10.0)


def test_released_reservations_go_back_to_the_budget():
    ledger = BudgetLedger(0.40, costs_seen=[""])  # (its provider's cost is known: reserve's default, unnamed)
    a, b = ledger.reserve(0.20), ledger.reserve(0.20)
    assert ledger.reserve(0.20) is None
    ledger.release(a)
    ledger.settle(b, 0.0)  # the provider said it cost nothing
    assert ledger.reserve(0.20) is not None and ledger.spent_usd == 0.0


def test_the_ledger_says_what_stands_against_the_cap():
    ledger = BudgetLedger(0.40, costs_seen=[""])
    first, second = ledger.reserve(0.20), ledger.reserve(0.20)
    assert ledger.standing() == "$0.00 spent, $0.40 held for predictions in flight"
    ledger.settle(first, 0.20)
    ledger.settle(second, 0.20)
    assert ledger.standing() == "$0.40 spent"


def test_once_a_prediction_costs_more_than_its_reservation_every_reservation_counts_as_dearer():
    ledger = BudgetLedger(1.0)
    first, second = ledger.reserve(0.20), ledger.reserve(0.20)
    ledger.settle(first, 0.25)  # charged 25% over the price reserved
    assert ledger.standing() == "$0.25 spent, $0.25 held for predictions in flight"  # the second's, marked up
    assert ledger.reserve(0.20) is not None and ledger.reserve(0.20) is not None  # $0.25 + 3 x $0.25 = $1.00
    assert ledger.reserve(0.20) is None  # $1.25 would cross the cap
    ledger.settle(second, 0.10)  # cheaper: the markup stays at the most seen
    assert ledger.standing() == "$0.35 spent, $0.50 held for predictions in flight"


def test_a_row_short_of_budget_only_for_predictions_in_flight_waits_for_them():
    ledger = BudgetLedger(0.60, costs_seen=[""])  # (what a prediction costs is known: the next test)
    flying = [ledger.reserve(0.20) for _ in range(3)]
    got: list = []
    asked = threading.Event()
    deadline = time.monotonic() + 10  # (a wait that never ends fails the test, not hangs it)

    def give_up() -> bool:
        asked.set()
        return time.monotonic() > deadline

    told: list[float] = []  # the wait is told once, as it begins (the progress line shows it)
    waiting = lambda: told.append(time.monotonic())  # noqa: E731
    waiter = threading.Thread(target=lambda: got.append(ledger.reserve(0.20, give_up=give_up, waiting=waiting)))
    waiter.start()
    assert asked.wait(5)  # it waits while those three hold the whole budget
    time.sleep(0.05)
    assert not got and len(told) == 1
    ledger.settle(flying[0], 0.20)
    time.sleep(0.05)
    assert not got  # still nothing left once the first cost its price
    ledger.settle(flying[1], 0.0)  # the second failed and cost nothing: its $0.20 comes back
    waiter.join(5)
    assert got and got[0] is not None and got[0].in_flight
    assert len(told) == 1  # however many times it looked again
    # No wait when the money is gone whatever those in flight cost, nor when none are in flight.
    ledger.settle(flying[2], 0.20)
    ledger.reserve(0.0)  # in flight, and costing nothing would not make room
    ledger.settle(got[0], 0.20)
    started = time.monotonic()
    assert ledger.reserve(0.20, give_up=lambda: time.monotonic() > started + 5, waiting=waiting) is None
    assert time.monotonic() - started < 0.5 and len(told) == 1  # nothing to wait for: not told
    held = BudgetLedger(0.20)
    held.hold(0.20)  # an earlier attempt's prediction, collected when its own row comes
    started = time.monotonic()
    assert held.reserve(0.20, give_up=lambda: time.monotonic() > started + 5) is None
    assert time.monotonic() - started < 0.5
    # A run that is stopping stops waiting.
    stopping = BudgetLedger(0.20)
    stopping.reserve(0.20)
    assert stopping.reserve(0.20, give_up=lambda: True) is None


def waiting_for(ledger: BudgetLedger, price: float) -> tuple[threading.Thread, list, list]:
    """A row reserving `price` in a thread of its own, as a run's rows do (told when it begins
    to wait; gives up after 10 s): the thread, what it got, and when it was told."""
    got: list = []
    told: list[float] = []
    deadline = time.monotonic() + 10
    row = threading.Thread(
        target=lambda: got.append(
            ledger.reserve(price, give_up=lambda: time.monotonic() > deadline, waiting=lambda: told.append(1.0))
        )
    )
    row.start()
    return row, got, told


def test_until_a_prediction_s_cost_comes_in_reservations_count_half_again_as_dear_and_rows_wait_for_it():
    # The config says $0.20 and the provider charges $0.25 (its price went up). A $0.90
    # budget let four predictions out at $0.20 before any cost came in: $1.00 spent.
    ledger = BudgetLedger(0.90)
    flying = [ledger.reserve(0.20) for _ in range(3)]  # 3 x $0.30
    assert all(flying)
    row, got, told = waiting_for(ledger, 0.20)  # it fits at its price ($0.80), not at $1.20
    wait_for(lambda: told, 5, "the fourth row to wait")
    ledger.settle(flying[0], 0.25)  # seen: every reservation counts 1.25 times dearer now
    ledger.settle(flying[1], 0.25)
    time.sleep(0.05)
    assert not got  # $0.50 spent, $0.25 and $0.25 more: $1.00
    ledger.settle(flying[2], 0.25)
    row.join(5)
    assert got == [None] and ledger.spent_usd == pytest.approx(0.75) and len(told) == 1
    # At its price, once the first cost comes in: the row that waited goes.
    ledger = BudgetLedger(0.40)
    first = ledger.reserve(0.20)
    row, got, told = waiting_for(ledger, 0.20)
    wait_for(lambda: told, 5, "the second row to wait")
    ledger.settle(first, 0.20)
    row.join(5)
    assert got and got[0] is not None and ledger.standing() == "$0.20 spent, $0.20 held for predictions in flight"
    # Nothing in flight to wait for: a row that fits at its price is sent (its own cost is
    # the one thing that can still cross the cap).
    assert BudgetLedger(0.20).reserve(0.20) is not None
    # Not a cost seen: what a failure owes, counted at the price for want of an answer.
    ledger = BudgetLedger(0.60)
    ledger.settle(ledger.reserve(0.20), 0.20, seen=False)
    assert ledger.reserve(0.20) is not None  # $0.20 spent, $0.30 held
    assert ledger.reserve(0.20, give_up=lambda: True) is None  # $0.20 + 2 x $0.30 (seen, 3 x $0.20 would fit)
    # An earlier attempt of the run saw it: the price counts from the first row.
    ledger = BudgetLedger(0.40, costs_seen=[""])
    assert ledger.reserve(0.20) is not None and ledger.reserve(0.20) is not None
    # Each provider's cost is learned apart: one charging its price says nothing of another
    # (a manifest's rows may name their own). Before, the first's cost let the second's
    # predictions out at their price (three), and it charged $0.25: $0.95 on $0.90.
    ledger = BudgetLedger(0.90)
    ledger.settle(ledger.reserve(0.20, provider="each"), 0.20)  # $0.20 spent
    dear = [ledger.reserve(0.20, provider="stability") for _ in range(2)]  # $0.20 + 2 x $0.30
    assert all(dear) and ledger.reserve(0.20, give_up=lambda: True, provider="stability") is None
    assert ledger.reserve(0.10, provider="each") is not None  # $0.90: "each" counts at its price
    ledger = BudgetLedger(0.90, costs_seen=["each"])  # an earlier attempt saw "each"'s, not "stability"'s
    assert ledger.reserve(0.20, provider="each") and ledger.reserve(0.20, provider="each")
    assert ledger.reserve(0.20, provider="stability")  # $0.40 + $0.30
    assert ledger.reserve(0.20, give_up=lambda: True, provider="stability") is None


def test_the_expected_wall_time_goes_by_the_rate_for_a_hosted_provider_and_by_the_cores_for_the_local_engine(
    tmp_path, monkeypatch
):
    # The estimate held the local engine to limits.requests_per_minute too, which it does not
    # pace by: 2,000 rows said 33 min and took 3 to 9 (the restoration example: 6 s for 2).
    monkeypatch.setenv("STABILITY_API_KEY", "k")
    sf.write(tmp_path / "fx.wav", np.full((3 * 8000, 1), 0.1, np.float32), 8000)
    rows = "".join(f"r{i:02d},fx.wav,1,1.5,p{i:02d}\n" for i in range(60))
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt\n" + rows)

    def estimate(provider: str, rpm: int, concurrency: int) -> dict:
        overrides = {"provider.name": provider, "runs_dir": str(tmp_path / "runs"), "output.uri": str(tmp_path / "o")}
        overrides |= {"limits.requests_per_minute": rpm, "limits.concurrency": concurrency}
        batch = Batch(load_manifest(tmp_path / "m.csv"), load_config(overrides=overrides), "estimate", dry_run=True)
        try:
            return batch.estimate(batch.manifest.edits)
        finally:
            batch.close()

    def expected(provider: str, rpm: int, concurrency: int) -> float:
        return estimate(provider, rpm, concurrency)["expected_seconds"]

    # A hosted provider: 60 creates paced at the rate, the last one's answer ~15 s after it ...
    assert expected("stability", rpm=60, concurrency=40) == 59.0 + 15.0
    # ... or 40 predictions of ~15 s at a time: a second wave for the last 20 (it said 22.5 s,
    # 60 predictions at 40 / 15 s each as if the last did not have to wait 15 s too).
    assert expected("stability", rpm=6000, concurrency=40) == 30.0
    assert expected("stability", rpm=6000, concurrency=60) == 15.6  # (the 60th create's turn: 0.6 s)
    # The local engine: the rate does not hold it back, nor do more rows at once than its cores.
    local = expected("local", rpm=60, concurrency=8)
    assert local == expected("local", rpm=6, concurrency=8) == expected("local", rpm=60, concurrency=64)
    assert local == pytest.approx(expected("local", rpm=60, concurrency=1) / cpu.AT_ONCE, abs=0.1)  # (each to 0.1 s)
    # ... each row's own work, and writing its result (a whole copy of its recording: 48 kB here).
    written = estimate("local", rpm=60, concurrency=8)["results_bytes"] / estimate_module.WRITTEN_BYTES_PER_SECOND
    assert 0 < written < 0.1
    busy = 60 * estimate_module.TYPICAL_SECONDS["local"] + written
    assert local == pytest.approx(busy / cpu.AT_ONCE, abs=0.05) and local < 60


def test_rows_of_a_hosted_model_and_of_the_local_engine_are_expected_to_take_the_longer_of_the_two(
    tmp_path, monkeypatch
):
    # A restoration manifest from `detect` with a hosted config: most rows the local
    # engine's, some the model's (its provider column). They run together, the local rows
    # while the model's wait for their answers; the estimate added the two.
    monkeypatch.setenv("EACHLABS_API_KEY", "k")
    sf.write(tmp_path / "fx.wav", np.full((3 * 8000, 1), 0.1, np.float32), 8000)

    def expected(local_rows: int, model_rows: int) -> float:
        rows = [f"l{i:03d},fx.wav,1,1.5,p{i},local\n" for i in range(local_rows)]
        rows += [f"m{i:03d},fx.wav,1,1.5,p{i},eachlabs\n" for i in range(model_rows)]
        (tmp_path / "m.csv").write_text("id,input,start,end,prompt,provider\n" + "".join(rows))
        overrides = {"provider.name": "eachlabs", "runs_dir": str(tmp_path / "runs"), "output.uri": str(tmp_path / "o")}
        batch = Batch(load_manifest(tmp_path / "m.csv"), load_config(overrides=overrides), "estimate", dry_run=True)
        try:
            est = batch.estimate(batch.manifest.edits)
        finally:
            batch.close()
        sent = {"local": local_rows, "eachlabs": model_rows}
        assert est["predictions_by_provider"] == {name: n for name, n in sent.items() if n}
        return est["expected_seconds"]

    # Two predictions: a latency after the second create's turn, not two fortieths of one.
    model = expected(0, 2)
    assert model == estimate_module.TYPICAL_SECONDS["eachlabs"] + 60 / load_config().limits.requests_per_minute
    few, many = expected(20, 0), expected(100, 0)
    assert few < model < many
    assert expected(20, 2) == model  # the local rows' 5 s are done while the model's run
    assert expected(100, 2) == many  # and the model's 15 s while the local rows' 25 s run


def test_the_local_engine_s_expected_time_grows_with_the_recording_it_searches(tmp_path):
    # It searches 90 s each side of a region for a passage: a 30-minute tape's 40 dropouts
    # took 30 s where the estimate said 11.7 (as if each were a 30-second clip).
    for seconds in (30, 120, 240):
        sf.write(tmp_path / f"t{seconds}.wav", np.full((seconds * 8000, 1), 0.1, np.float32), 8000)
    rows = "".join(f"r{s}_{i},t{s}.wav,{10 + i},{10.05 + i},p,{{row_id}}\n" for s in (30, 120, 240) for i in range(4))
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt,output\n" + rows)
    overrides = {"runs_dir": str(tmp_path / "runs"), "output.uri": str(tmp_path / "o"), "limits.concurrency": 1}
    batch = Batch(load_manifest(tmp_path / "m.csv"), load_config(overrides=overrides), "estimate", dry_run=True)
    try:
        est = batch.estimate(batch.manifest.edits)
    finally:
        batch.close()
    written = est["results_bytes"] / estimate_module.WRITTEN_BYTES_PER_SECOND
    row = estimate_module.TYPICAL_SECONDS["local"]
    assert est["expected_seconds"] == pytest.approx(4 * row + 4 * 1.5 * row + 4 * 2 * row + written, abs=0.05)


def test_a_provider_is_out_of_reach_only_after_creates_in_a_row_come_to_nothing():
    reach = Reach(after=3)
    for _ in range(10):  # sporadic failures, with creates taken in between, never add up
        reach.missed("create answered HTTP 503")
        reach.missed("create answered HTTP 503")
        reach.answered()
    assert reach.lost() is None
    reach.missed("create answered HTTP 503")
    reach.missed("create answered HTTP 503")
    reach.missed("cannot connect to https://api.example (the connection was refused).")
    assert reach.lost() == (
        "the last 3 creates to it all came to nothing, the last one with: "
        "cannot connect to https://api.example (the connection was refused)"
    )


def test_requests_are_paced_smoothly_with_a_small_burst():
    clock = FakeClock()
    limiter = RateLimiter(600, clock=clock, sleep=clock.sleep)  # 10 per second, counted per minute
    times = []
    for _ in range(10):
        limiter.acquire()
        times.append(clock.now)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    interval = 0.1 / 0.99  # 1% under the limit
    assert times[0] == 0.0 and all(g == pytest.approx(interval) for g in gaps)  # no burst at the start
    clock.now += 60  # idle: the small burst refills, and no more than it
    start = clock.now
    after_idle = []
    for _ in range(7):
        limiter.acquire()
        after_idle.append(clock.now - start)
    # The burst: 4 at once, not a minute's worth; then the pace again.
    assert after_idle == pytest.approx([0.0] * 4 + [interval, 2 * interval, 3 * interval], abs=1e-9)


def test_no_burst_where_the_provider_counts_over_a_short_window():
    # 100 per 10 s: 99 paced requests leave room for one that arrives late, none for a burst.
    assert RateLimiter(600, window=10).burst == 1.0
    assert RateLimiter(60).burst == 1.0  # 1 per second over a minute: 0.6 to spare
    assert RateLimiter(600).burst == 4.0


def test_a_short_window_is_paced_with_50_ms_to_spare():
    # 8 per 2 s: 1% of the window would be 20 ms, less than a late thread's jitter; the 8 are
    # spread over 2.05 s. From a 5 s window up the margin is 1% of it, as before.
    clock = FakeClock()
    limiter = RateLimiter(240, window=2, clock=clock, sleep=clock.sleep)
    times = []
    for _ in range(9):
        limiter.acquire()
        times.append(clock.now)
    assert times[8] - times[0] == pytest.approx(2.05) and limiter.burst == 1.0
    assert RateLimiter(600, window=10).configured == pytest.approx(10 * 0.99)
    assert RateLimiter(600).configured == pytest.approx(10 * 0.99)


def test_a_request_held_past_its_turn_holds_back_the_one_a_window_later():
    # 8 per 2 s, paced 0.25625 s apart. The first request's journal line waited 0.1 s for the
    # disk, so it went out at 0.1; the ninth's turn comes 1.95 s after that, within the window.
    clock = FakeClock()
    limiter = RateLimiter(240, window=2, clock=clock, sleep=clock.sleep)
    went, waits = [], []
    for i in range(12):
        limiter.acquire()
        if i == 0:
            clock.now += 0.1
        waits.append(limiter.sending())
        went.append(clock.now)
    assert went[8] == pytest.approx(0.1 + 2 + limiter.GUARD_SECONDS)
    assert all(later - first >= 2 + limiter.GUARD_SECONDS - 1e-9 for first, later in zip(went, went[8:], strict=False))
    # Only the ninth waited: the others went at their turns, the tenth at its own (not pushed back).
    assert [i for i, w in enumerate(waits) if w > 0] == [8] and went[9] == pytest.approx(9 * 2.05 / 8)


def test_callers_waiting_together_get_their_own_turns_and_a_late_waker_costs_nobody_theirs():
    clock = FakeClock()
    slept: list[float] = []
    limiter = RateLimiter(600, window=10, clock=clock, sleep=slept.append)  # the clock stands still
    interval = 0.1 / 0.99
    for _ in range(3):  # three rows arrive at once: each is told its own send time
        limiter.acquire()
    assert slept == pytest.approx([interval, 2 * interval])
    # The machine was busy and everyone woke late; the next arrival keeps its own turn
    # (three intervals after the first) instead of being pushed back by their lateness.
    clock.now = 2.5 * interval
    limiter.acquire()
    assert slept[-1] == pytest.approx(0.5 * interval)


def test_a_wait_ends_early_when_the_run_is_stopped():
    # 6 a minute: the third caller's turn is 20 s away; the run is stopped 1 s into its wait.
    clock = FakeClock()
    limiter = RateLimiter(6, clock=clock, sleep=clock.sleep)
    limiter.acquire()
    limiter.acquire()
    start = clock.now
    waited = limiter.acquire(give_up=lambda: clock.now >= start + 1.0)
    assert waited == pytest.approx(1.0, abs=limiter.LOOK_UP_SECONDS)
    assert limiter.acquire() > 10  # without a stop, a caller waits its turn out


def test_a_429_voids_the_turns_already_given_out():
    clock = FakeClock()
    limiter = RateLimiter(600, window=10, clock=clock)

    def sleep_while_another_row_gets_a_429(seconds: float) -> None:
        if clock.now == 0.0:
            limiter.throttled(retry_after=2.0)
        clock.sleep(seconds)

    limiter.acquire()
    limiter._sleep = sleep_while_another_row_gets_a_429
    limiter.acquire()  # was told 0.1 s, slept through a 429: it queues again behind Retry-After
    assert clock.now == pytest.approx(2.0)


def test_a_429_stops_everyone_until_retry_after_and_recovery_is_gradual():
    clock = FakeClock()
    limiter = RateLimiter(60, clock=clock, sleep=clock.sleep)
    limiter.acquire()
    limiter.throttled(retry_after=5.0)
    assert limiter.rate == pytest.approx(limiter.configured * 0.9)  # it eases off
    limiter.throttled(retry_after=None)
    assert limiter.rate == pytest.approx(limiter.configured * 0.45)  # no Retry-After: it halves
    limiter.acquire()
    assert clock.now >= 5.0  # nobody went before Retry-After
    for _ in range(5):
        limiter.succeeded()
    assert limiter.rate == pytest.approx(limiter.configured * 0.70)  # +1/20 of the rate per success
    for _ in range(50):
        limiter.succeeded()
    assert limiter.rate == pytest.approx(limiter.configured)


def hosted_job(tmp_path, aws_env, monkeypatch, rows: int) -> None:
    """What the hosted-provider tests here run: `rows` rows of a 3 s clip, a staging bucket, a key."""
    monkeypatch.setenv("EACHLABS_API_KEY", "k")
    sf.write(tmp_path / "fx.wav", np.full((3 * 8000, 1), 0.1, np.float32), 8000)
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt\n" + "".join(f"r{i:02d},fx.wav,1,1.5,p{i:02d}\n" for i in range(rows))
    )
    aws_env.bucket("stage")


def run_hosted(tmp_path, aws_env, sim, run_id: str, threads: int | None = None, **overrides) -> tuple[list, Batch]:
    """Every row of the job through one Batch on `threads` threads (default: as the flow does)."""
    cfg = hosted_config(sim, aws_env.endpoint, str(tmp_path / run_id), tmp_path / "runs", **overrides)
    batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, run_id)
    with ThreadPoolExecutor(threads or batch.rows_at_once) as pool:
        outcomes = list(pool.map(batch.process, batch.manifest.edits))
    batch.close()
    return outcomes, batch


def test_pacing_at_the_providers_rate_avoids_its_429s(tmp_path, aws_env, simulator_process, monkeypatch):
    hosted_job(tmp_path, aws_env, monkeypatch, rows=24)
    results = {}
    for label, rpm in (("paced", 240), ("unpaced", 100000)):
        sim = simulator_process(
            "--latency", "0.05", "--fill", "tone", "--rpm", "240", "--rate-window", "2"
        )  # 8 per 2 s
        outcomes, _ = run_hosted(
            tmp_path,
            aws_env,
            sim,
            label,
            threads=24,
            # All 24 at once unless paced; told the provider's window, as its docs would say.
            **{"limits.requests_per_minute": rpm, "limits.rate_window_seconds": 2, "limits.concurrency": 24},
        )
        assert [o.status for o in outcomes] == ["succeeded"] * 24
        results[label] = sim.stats()["rate_limited"]
    # Unpaced, 24 rows against 8 per 2 s draw some ten 429s; with 12 rows the shared Retry-After
    # wait after the first one spread the other four out, and one 429 in all came up in CI.
    # Paced, a 429 is a matter of timing: with 1% of the window to spare (20 ms of 2 s), a
    # thread that a busy 2-core machine woke late drew one or two; with 50 ms to spare, none
    # came up beside two busy processes, but two did once in CI with the simulator a thread
    # of the test's process (most likely: it counts a request when it gets the interpreter
    # lock, which 24 client threads want too, not when the request comes); the provider now
    # runs in a process of its own, as it does in use. Two came up again so in CI: a create's
    # journal line held it past its turn (the next test), which sends now make up for. The
    # share of 429s is measured where timing belongs, in bench/limits.py; here, pacing must
    # avoid nearly all of them.
    assert results["unpaced"] >= 4, results  # the provider limits, and its count is read
    assert results["paced"] <= 1 and 4 * results["paced"] <= results["unpaced"], results


def test_creates_the_disk_held_past_their_turns_draw_no_429s(tmp_path, aws_env, simulator_process, monkeypatch):
    # A create's journal line is on disk before it goes out; a busy disk can take 150 ms for it
    # (CI drew two 429s so). Three of the 24 are held that long here: sent as paced, the create
    # a window's count after each would arrive within the held one's window (2 429s in 2 runs).
    hosted_job(tmp_path, aws_env, monkeypatch, rows=24)
    sim = simulator_process("--latency", "0.05", "--fill", "tone", "--rpm", "240", "--rate-window", "2")
    append, held = Journal._append, []

    def slow_disk(journal, data: bytes, durable: bool) -> None:
        append(journal, data, durable)
        if b'"creating"' in data:
            held.append(data)
            if len(held) in (1, 10, 19):
                time.sleep(0.15)

    monkeypatch.setattr(Journal, "_append", slow_disk)
    outcomes, _ = run_hosted(
        tmp_path,
        aws_env,
        sim,
        "held",
        threads=24,
        **{"limits.requests_per_minute": 240, "limits.rate_window_seconds": 2, "limits.concurrency": 24},
    )
    assert [o.status for o in outcomes] == ["succeeded"] * 24 and len(held) >= 19  # all three were held
    assert sim.stats()["rate_limited"] <= 1  # as in the test above: timing's own jitter may draw one


def test_the_budget_holds_at_concurrency_32_under_5xx_timeouts_and_429_bursts(
    tmp_path, aws_env, simulator, monkeypatch
):
    hosted_job(tmp_path, aws_env, monkeypatch, rows=64)
    sim = simulator(
        latency=0.3,
        fill="tone",
        seed=3,
        error_rate=0.2,  # 503 on create
        slow_create_rate=0.2,
        slow_create_seconds=2.0,  # made, but answered after the client's timeout
        rpm=600,
        rate_window=1.0,  # bursts beyond 10 per second are answered 429
    )
    budget = 6.0  # 30 of the 64 rows
    outcomes, batch = run_hosted(
        tmp_path,
        aws_env,
        sim,
        "stress",
        threads=32,
        **{
            "provider.timeout_seconds": 1.0,
            "provider.max_retries": 8,
            "limits.requests_per_minute": 100000,  # no pacing: let the 429 bursts come
            "limits.budget_usd": budget,
            "limits.concurrency": 32,
        },
    )
    statuses = {o.status for o in outcomes}
    assert statuses <= {"succeeded", "failed", "skipped_budget"} and "skipped_budget" in statuses
    assert sim.stats.rate_limited > 0 and sim.stats.server_errors > 0  # the faults did happen
    spent = sum(o.cost_usd for o in outcomes)
    assert sim.billed() <= budget + 1e-9  # what the provider charged
    assert spent <= budget + 1e-9 and spent >= sim.billed() - 1e-9  # what the report says
    assert batch.ledger.spent_usd == pytest.approx(spent)
    assert all(o.cost_usd == 0 for o in outcomes if o.status == "skipped_budget")
    assert len(sim.stats.prompts) == len(set(sim.stats.prompts))  # never created twice


def test_a_budget_buys_every_prediction_it_can_when_they_cost_less_than_their_price(
    tmp_path, aws_env, simulator, monkeypatch
):
    # The provider charges $0.10 where the config's price is $0.20 (a price that changed, a
    # discount): the first five rows held the whole $1.00 while in flight, and the other five
    # were skipped at once; they cost $0.50, and half the budget was left unused. Now those
    # rows wait for the predictions in flight, and the budget buys all it can at the price
    # reserved: nine, the tenth being $0.20 that $0.10 left cannot cover.
    hosted_job(tmp_path, aws_env, monkeypatch, rows=10)
    sim = simulator(latency=0.3, fill="tone", price=0.10)
    overrides = {"limits.budget_usd": 1.0, "limits.concurrency": 5, "limits.requests_per_minute": 100000}
    outcomes, batch = run_hosted(tmp_path, aws_env, sim, "cheaper", threads=10, **overrides)
    statuses = [o.status for o in outcomes]
    assert statuses.count("succeeded") == 9 and statuses.count("skipped_budget") == 1, statuses
    assert sum(o.cost_usd for o in outcomes) == pytest.approx(0.9) == sim.billed()
    assert batch.ledger.spent_usd == pytest.approx(0.9)
    skipped = next(o for o in outcomes if o.status == "skipped_budget")
    assert skipped.cost_usd == 0 and skipped.error == "Budget of $1.00 reached ($0.90 spent); this row was not sent."
    # Rows that waited said so in the journal, for the progress line, once each: of the
    # rows after the first three (those that found the budget free at half again the
    # price, as it counts until a cost comes in), one at least.
    waited = [e["row"] for e in read_events(tmp_path / "runs" / "cheaper") if e["event"] == "waiting_for_budget"]
    assert len(waited) == len(set(waited)) and 1 <= len(waited) <= 7, waited


def test_a_provider_charging_more_than_its_price_is_counted_dearer_from_then_on_and_on_reruns_and_the_cap_holds(
    tmp_path, aws_env, simulator, monkeypatch, caplog
):
    # Each Labs charges $0.25 where the config says $0.20 (its price went up). Reserving
    # $0.20 a prediction, the predictions in flight as the cap came near cost more than was
    # held for them, and the run went over: $2.00 on a $1.90 budget. Once a prediction costs
    # more than its reservation, every reservation counts that much dearer, those already
    # in flight too: 4 rows at a time reserved before any cost was known ($1.00), then 3
    # more ($0.75); the rest are skipped_budget.
    hosted_job(tmp_path, aws_env, monkeypatch, rows=12)
    sim = simulator(latency=0.3, fill="tone", price=0.25)
    overrides = {"limits.budget_usd": 1.9, "limits.concurrency": 2, "limits.requests_per_minute": 100000}
    caplog.set_level("WARNING", logger="soundpatch")
    outcomes, batch = run_hosted(tmp_path, aws_env, sim, "dearer", **overrides)
    assert batch.rows_at_once == 4
    assert sim.billed() == pytest.approx(1.75) and sum(o.cost_usd for o in outcomes) == pytest.approx(1.75)
    assert [o.status for o in outcomes].count("succeeded") == 7 == sim.stats.accepted
    assert [o.status for o in outcomes].count("skipped_budget") == 5
    said = (
        "eachlabs charged up to $0.25 for a prediction reserved at $0.2 (provider.price_usd): the budget counts "
        "every prediction as 1.25 times dearer from then on, those in flight too; set price_usd to what "
        "eachlabs charges, so that the cap holds from the first row."
    )
    assert caplog.messages.count(said) == 1 and said in batch.notes()

    # The same run again, on a budget raised to $2.65: $0.90 left. Learning it anew, the
    # rerun reserved $0.20 for each of its first 4 rows ($0.80) and paid $1.00 for them:
    # $2.75 in all. What earlier attempts found counts from the first row: 3 rows, $2.50.
    caplog.clear()
    overrides["limits.budget_usd"] = 2.65
    before = (
        "An earlier attempt of run dearer found eachlabs charging up to $0.25 for a prediction reserved at $0.2 "
        "(provider.price_usd): the budget counts every prediction as 1.25 times dearer from this attempt's first "
        "row; set price_usd to what eachlabs charges."
    )
    # The dry run says so, and expects what the provider charged.
    cfg = hosted_config(sim, aws_env.endpoint, str(tmp_path / "dearer"), tmp_path / "runs", **overrides)
    dry = Batch(load_manifest(tmp_path / "m.csv"), cfg, "dearer", dry_run=True, earlier_attempts=True)
    estimate = dry.estimate(dry.manifest.edits)
    dry.close()
    assert estimate["predictions"] == 5 and estimate["expected_cost_usd"] == pytest.approx(1.25)
    assert estimate["within_budget"] == 3 and before in estimate["notes"]
    again, batch = run_hosted(tmp_path, aws_env, sim, "dearer", **overrides)
    assert sim.billed() == pytest.approx(2.50) and sim.stats.accepted == 10
    statuses = [o.status for o in again]  # (the rows done before are kept as they were: skipped_done)
    assert (statuses.count("succeeded"), statuses.count("skipped_budget"), statuses.count("skipped_done")) == (3, 2, 7)
    assert caplog.messages.count(before) == 1 and before in batch.notes() and said not in batch.notes()
    # Told the price it charges, nothing is marked up and nothing said.
    overrides["provider.price_usd"] = 0.25
    overrides["limits.budget_usd"] = 3.0
    caplog.clear()
    again, batch = run_hosted(tmp_path, aws_env, sim, "dearer", **overrides)
    assert sim.billed() == pytest.approx(3.0) and [o.status for o in again].count("succeeded") == 2
    assert not [n for n in batch.notes() if "dearer" in n] and not caplog.messages


def test_a_provider_charging_more_than_its_price_cannot_take_a_small_budget_over_before_its_first_cost_comes_in(
    tmp_path, aws_env, simulator, monkeypatch
):
    # $0.25 a prediction where the config says $0.20, on a budget of $0.90: four rows went
    # out at $0.20 each before any cost came in, and the run paid $1.00. Until then a
    # reservation counts half again as dear: three go, and the rows after them wait for the
    # first cost; at $0.25 each, $0.15 is left, and they are skipped_budget.
    hosted_job(tmp_path, aws_env, monkeypatch, rows=8)
    sim = simulator(latency=0.3, fill="tone", price=0.25)
    overrides = {"limits.budget_usd": 0.9, "limits.concurrency": 5, "limits.requests_per_minute": 100000}
    outcomes, batch = run_hosted(tmp_path, aws_env, sim, "small", threads=8, **overrides)
    statuses = [o.status for o in outcomes]
    assert sim.billed() == pytest.approx(0.75) == sum(o.cost_usd for o in outcomes) <= 0.9
    assert (statuses.count("succeeded"), statuses.count("skipped_budget")) == (3, 5), statuses
    waited = {e["row"] for e in read_events(tmp_path / "runs" / "small") if e["event"] == "waiting_for_budget"}
    assert waited  # (the progress line says so)


def test_a_provider_s_cost_is_learned_apart_from_another_s_in_a_manifest_mixing_them(
    tmp_path, aws_env, simulator, monkeypatch
):
    # Rows may name their own provider. Stability charges its price; Each Labs rows charged
    # $0.25 where its price is $0.20. Once Stability's first cost came in, the Each Labs rows
    # were reserved at their price, three went out on the $0.60 left, and the run paid
    # $1.15 on a budget of $1.00. Each Labs' cost unseen, they count half again as dear.
    hosted_job(tmp_path, aws_env, monkeypatch, rows=8)
    monkeypatch.setenv("STABILITY_API_KEY", "k")
    rows = [f"r{i:02d},fx.wav,1,1.5,p{i:02d},{'' if i < 2 else 'eachlabs'}\n" for i in range(8)]
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt,provider\n" + "".join(rows))
    stability = simulator(latency=0.05, fill="tone")
    each = simulator(latency=0.3, fill="tone", price=0.25)
    monkeypatch.setitem(config_module.DEFAULT_BASE_URLS, "eachlabs", each.base_url)  # the rows' provider's own
    overrides = {"provider.name": "stability", "provider.base_url": stability.base_url, "limits.budget_usd": 1.0}
    overrides |= {"limits.concurrency": 5, "limits.requests_per_minute": 100000}
    cfg = hosted_config(stability, aws_env.endpoint, str(tmp_path / "mixed"), tmp_path / "runs", **overrides)
    batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, "mixed")
    first = [batch.process(edit) for edit in batch.manifest.edits[:2]]  # Stability's, one after the other
    with ThreadPoolExecutor(6) as pool:
        rest = list(pool.map(batch.process, batch.manifest.edits[2:]))
    batch.close()
    assert [o.status for o in first] == ["succeeded"] * 2 and stability.billed() == pytest.approx(0.40)
    statuses = [o.status for o in rest]
    assert (statuses.count("succeeded"), statuses.count("skipped_budget")) == (2, 4), statuses
    assert each.billed() == pytest.approx(0.50) == sum(o.cost_usd for o in rest)  # $0.90 in all


def test_a_rerun_on_a_budget_below_what_the_run_spent_sends_nothing_and_says_why(
    tmp_path, aws_env, simulator, monkeypatch
):
    # The budget counts the whole run. A rerun told a smaller one than its earlier attempts
    # spent summed up as "spent $0.40 of $0.20 budget", which reads as a crossed cap.
    hosted_job(tmp_path, aws_env, monkeypatch, rows=4)
    sim = simulator(latency=0.1, fill="tone")
    overrides = {"limits.budget_usd": 0.40, "limits.requests_per_minute": 100000}
    outcomes, batch = run_hosted(tmp_path, aws_env, sim, "lowered", **overrides)
    assert [o.status for o in outcomes].count("succeeded") == 2 and not [n for n in batch.notes() if "Earlier" in n]
    overrides["limits.budget_usd"] = 0.20
    again, batch = run_hosted(tmp_path, aws_env, sim, "lowered", **overrides)
    assert sorted(o.status for o in again) == ["skipped_budget", "skipped_budget", "skipped_done", "skipped_done"]
    assert sim.stats.accepted == 2 and sum(o.cost_usd for o in again) == pytest.approx(0.40)
    assert (
        "Earlier attempts of run lowered spent or committed $0.40, more than this attempt's budget of $0.20, which "
        "counts the whole run: this attempt sent nothing new (a budget above $0.40 lets it go on)."
    ) in batch.notes()


class SlotsNotGivenBack:
    """Shared limits whose prediction slot cannot be given back once the prediction is done,
    as Prefect's strict slot raised with its server away: an error of ours, after the create."""

    def create(self) -> None:
        pass

    @contextmanager
    def prediction(self):
        yield
        raise RuntimeError("the slot could not be given back")


def test_an_unforeseen_error_after_a_create_keeps_its_cost_against_the_budget_and_its_prediction(
    tmp_path, aws_env, simulator, monkeypatch
):
    # An error nobody foresaw ends the row after its prediction was made and paid for. It
    # released the row's reservation as if nothing had been sent: the budget's other rows
    # spent it again (four created on a budget of two), the row said $0, and a rerun paid
    # for it once more. Now it is owed, as a create in doubt is, and collected by the rerun.
    hosted_job(tmp_path, aws_env, monkeypatch, rows=4)
    sim = simulator(latency=0.2, fill="tone")
    overrides = {"limits.budget_usd": 0.40, "limits.concurrency": 4, "limits.requests_per_minute": 100000}
    cfg = hosted_config(sim, aws_env.endpoint, str(tmp_path / "faulty"), tmp_path / "runs", **overrides)
    slots = SlotsNotGivenBack()
    batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, "faulty", shared=lambda _provider: slots)
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(batch.process, batch.manifest.edits))
    batch.close()
    statuses = [o.status for o in outcomes]
    assert statuses.count("failed") == 2 and statuses.count("skipped_budget") == 2, statuses
    assert sim.stats.accepted == 2 and sim.billed() == pytest.approx(0.40)
    assert batch.ledger.spent_usd == pytest.approx(0.40) == sum(o.cost_usd for o in outcomes)
    for failed in (o for o in outcomes if o.status == "failed"):
        assert failed.cost_usd == pytest.approx(0.20)
        assert "RuntimeError: the slot could not be given back" in failed.error
        assert "the paid prediction is kept, and rerunning with --run-id faulty tries it again at no new cost" in (
            failed.error
        )
    # The same run again, the fault gone: the two are collected, not created again.
    again, batch = run_hosted(tmp_path, aws_env, sim, "faulty", threads=4, **overrides)
    assert sorted(o.status for o in again) == ["skipped_budget", "skipped_budget", "succeeded", "succeeded"]
    assert sim.stats.accepted == 2 and sim.billed() == pytest.approx(0.40)
    assert batch.ledger.spent_usd == pytest.approx(0.40)


def test_predictions_in_flight_never_pass_limits_concurrency_while_more_rows_are_worked_on(
    tmp_path, aws_env, simulator, monkeypatch
):
    # Rows are worked on two per slot (clips staged, results finished), but only
    # limits.concurrency predictions are ever out at the provider at once.
    hosted_job(tmp_path, aws_env, monkeypatch, rows=18)
    sim = simulator(latency=0.4, fill="tone")
    outcomes, batch = run_hosted(
        tmp_path, aws_env, sim, "slots", **{"limits.concurrency": 3, "limits.requests_per_minute": 100000}
    )
    assert batch.rows_at_once == 6  # two rows per prediction slot
    assert [o.status for o in outcomes] == ["succeeded"] * 18
    assert sim.stats.max_in_flight == 3


def test_the_local_engine_s_rows_in_flight_on_the_progress_line_never_pass_limits_concurrency(tmp_path, monkeypatch):
    # The progress line counted the local engine's rows in flight from when they were sent:
    # up to twice limits.concurrency, the rest of them waiting for a slot. Now from the slot.
    from soundpatch.progress import ProgressWatcher
    from soundpatch.providers.local import LocalEngine

    sf.write(tmp_path / "fx.wav", np.full((3 * 8000, 1), 0.1, np.float32), 8000)
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt\n" + "".join(f"r{i:02d},fx.wav,1,1.5,p{i:02d}\n" for i in range(12))
    )
    inpaint = LocalEngine._inpaint

    def slow(self, request):
        time.sleep(0.05)  # time enough for the rows behind it to be sent and wait for a slot
        return inpaint(self, request)

    monkeypatch.setattr(LocalEngine, "_inpaint", slow)
    cfg = load_config(
        overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs"), "limits.concurrency": 2}
    )
    batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, "local")
    with ThreadPoolExecutor(batch.rows_at_once) as pool:
        outcomes = list(pool.map(batch.process, batch.manifest.edits))
    batch.close()
    assert [o.status for o in outcomes] == ["succeeded"] * 12
    # The run's journal, read by the progress line one event at a time.
    (tmp_path / "watched").mkdir()
    watcher = ProgressWatcher(tmp_path / "watched", total=12, budget=10.0)
    watcher._since = 0.0  # (its events came before the watcher began)
    in_flight, sent, most_sent = [], set(), 0
    with (tmp_path / "watched" / "journal.jsonl").open("w") as journal:
        for line in (tmp_path / "runs" / "local" / "journal.jsonl").read_text().splitlines(keepends=True):
            journal.write(line)
            journal.flush()
            in_flight.append(watcher._state()[3])
            event = json.loads(line)
            if event["event"] == "sending":
                sent.add(event["row"])
            elif event["event"] == "outcome":
                sent.discard(event["row"])
            most_sent = max(most_sent, len(sent))
    assert most_sent > 2  # rows were sent while two others had the slots
    assert max(in_flight) == 2 and in_flight[-1] == 0


def test_rows_crunch_their_audio_a_few_at_a_time_so_creates_and_polls_are_not_kept_waiting(
    tmp_path, aws_env, simulator, monkeypatch
):
    # Twelve predictions end together. Preparing clips, aligning results, splicing, encoding,
    # checking and drawing report cards are held to cpu.AT_ONCE rows at a time: otherwise a
    # thread that only needs the interpreter lock to send the next create or poll waits
    # behind all twelve, slice after slice.
    hosted_job(tmp_path, aws_env, monkeypatch, rows=12)
    sim = simulator(latency=0.3, fill="tone")
    lock, inside, most = threading.Lock(), [0], [0]

    def counted(fn):
        def crunch(*args, **kwargs):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.02)  # time enough for every other row to get here, if let in
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    inside[0] -= 1

        return crunch

    for module, name in (
        (hosted, "prepare_clip"),  # every hosted provider's clip (Each Labs here)
        (hosted, "recover_region"),
        (splicing, "judge"),  # the checks of the result as read back
        (preview, "draw"),
    ):
        monkeypatch.setattr(module, name, counted(getattr(module, name)))
    outcomes, _ = run_hosted(
        tmp_path, aws_env, sim, "crunch", **{"limits.concurrency": 12, "limits.requests_per_minute": 100000}
    )
    assert [o.status for o in outcomes] == ["succeeded"] * 12
    assert (tmp_path / "runs" / "crunch" / "previews").is_dir()  # report cards were drawn too
    assert most[0] == cpu.AT_ONCE


def test_a_crunching_step_inside_another_goes_straight_on():
    # Nested steps on one thread must not wait for the gate they already hold (with one core
    # the gate has one place, and waiting for it would hang the row for good).
    done = threading.Event()

    def nested() -> None:
        with ExitStack() as steps:
            for _ in range(cpu.AT_ONCE + 1):  # deeper than the gate has places
                steps.enter_context(cpu.crunching())
            done.set()

    worker = threading.Thread(target=nested, daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert done.is_set()
    with cpu.crunching():  # and the gate was given back whole
        pass
