"""Rows of many long recordings at once: each recording decoded only when there is room
for it in memory (limits.inputs_memory_mb), in the order rows asked, and never stuck."""

from __future__ import annotations

import json
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf

from soundpatch.config import load_config
from soundpatch.memory_room import MemoryRoom, NotAdmitted, default_limit_bytes, machine_memory

MB = 2**20


def until(condition, seconds: float = 10.0) -> bool:
    """Whether `condition()` came true within `seconds` (asked every 10 ms)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_recordings_are_let_in_while_they_fit_first_asked_first_and_one_too_large_alone():
    room = MemoryRoom(100 * MB)
    order: list[str] = []
    told: list[tuple[str, bool]] = []
    release = {name: threading.Event() for name in ("a", "b", "c", "big")}

    def row(name: str, nbytes: int) -> None:
        with room.holding(name, give_up=lambda: False, waiting=lambda still: told.append((name, still))):
            room.admit(name, nbytes)
            order.append(name)
            release[name].wait(10)

    threads = {}
    # Asked in this order: each asks once the one before is let in, or says it waits (as
    # sleeping a tenth of a second between them was not always enough on a busy machine).
    for name, nbytes, asked in (
        ("a", 60 * MB, lambda: order == ["a"]),
        ("b", 30 * MB, lambda: order == ["a", "b"]),
        ("big", 250 * MB, lambda: ("big", True) in told),
        ("c", 10 * MB, lambda: ("c", True) in told),
    ):
        threads[name] = threading.Thread(target=row, args=(name, nbytes))
        threads[name].start()
        assert until(asked), (name, order, told)
    assert order == ["a", "b"] and room.in_use == 90 * MB  # c would fit, but big asked first
    release["a"].set()
    time.sleep(0.3)
    assert order == ["a", "b"]  # big waits for the room to be empty
    release["b"].set()
    assert until(lambda: order == ["a", "b", "big"]), order
    assert room.in_use == 250 * MB
    release["big"].set()
    assert until(lambda: order == ["a", "b", "big", "c"]), order
    release["c"].set()
    for t in threads.values():
        t.join(5)
    assert room.in_use == 0 and room.peak == 250 * MB
    assert sorted(told) == [("big", False), ("big", True), ("c", False), ("c", True)]


def test_rows_of_a_recording_already_held_share_it_and_a_stopped_run_ends_the_wait():
    room = MemoryRoom(100 * MB)
    stop = threading.Event()
    with room.holding("tape", give_up=stop.is_set, waiting=lambda still: None):
        room.admit("tape", 80 * MB)
        with room.holding("tape", give_up=stop.is_set, waiting=lambda still: None):
            room.admit("tape", 80 * MB)  # the same recording: no more room, no wait
            assert room.in_use == 80 * MB
        room.admit("not-held", 500 * MB)  # read for something else than a row: not counted
        ended: list[BaseException] = []

        def other() -> None:
            try:
                with room.holding("other", give_up=stop.is_set, waiting=lambda still: None):
                    room.admit("other", 50 * MB)
            except NotAdmitted as exc:
                ended.append(exc)

        waiter = threading.Thread(target=other)
        waiter.start()
        time.sleep(0.2)
        stop.set()
        waiter.join(3)
        assert not waiter.is_alive() and len(ended) == 1
    assert room.in_use == 0


def test_a_recording_kept_from_an_earlier_row_counts_while_a_row_holds_it_again(tmp_path):
    # The first row of a tape decodes it and ends; the tape stays in the reader's cache. The
    # next row of it takes it from there, decoding nothing: it holds it all the same, and
    # rows of other recordings must wait for it as for a decoded one.
    from soundpatch.sources import SourceReader

    (name,) = _tapes(tmp_path, 1, 2.0)
    uri = str(tmp_path / name)
    room = MemoryRoom(1 * MB)
    reader = SourceReader(room=room)
    with room.holding(uri, give_up=lambda: False, waiting=lambda still: None):
        first = reader.audio(uri)
        assert room.in_use == first.samples.nbytes
    assert room.in_use == 0
    with room.holding(uri, give_up=lambda: False, waiting=lambda still: None):
        assert reader.audio(uri) is first  # from the cache
        assert room.in_use == first.samples.nbytes  # ... and counted


def test_the_default_is_half_the_memory_this_process_may_use():
    total_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    memory = machine_memory()
    assert memory is not None and 0 < memory <= total_kb * 1024 * 1.01  # the machine's, or its container's
    assert default_limit_bytes() == memory // 2


def _tapes(folder, count: int, seconds: float, rate: int = 48000) -> list[str]:
    rng = np.random.default_rng(1)
    names = []
    for k in range(count):
        name = f"tape{k}.wav"
        samples = rng.integers(-8000, 8000, (int(seconds * rate), 2), dtype=np.int16)
        sf.write(folder / name, samples, rate, subtype="PCM_16")
        names.append(name)
    return names


@pytest.mark.parametrize("limit_tapes", [1.5, 0.5], ids=["one-and-a-half tapes", "less than one tape"])
def test_rows_of_many_recordings_at_once_hold_no_more_of_them_than_the_limit(tmp_path, monkeypatch, limit_tapes):
    # Eight recordings, a row each, worked on eight at once (as the flow does): with room for
    # one and a half of them, they are decoded one at a time and every row is done; with
    # less room than one takes, each is still done, alone. Results are the recordings
    # outside their regions, bit for bit. What is counted is what is alive: each decoded
    # recording is watched until it is freed.
    from soundpatch import sources
    from soundpatch.batch import Batch
    from soundpatch.manifest import load_manifest

    decoded: list[weakref.ref] = []
    alive_at_decode: list[int] = []
    real_decode = sources.decode

    def watched_decode(*args, **kwargs):
        audio = real_decode(*args, **kwargs)
        decoded.append(weakref.ref(audio.samples))
        alive_at_decode.append(sum(ref() is not None for ref in decoded))
        return audio

    monkeypatch.setattr(sources, "decode", watched_decode)

    seconds, rate = 20.0, 48000
    names = _tapes(tmp_path, 8, seconds, rate)
    tape_bytes = int(seconds * rate) * 2 * 2
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt\n" + "".join(f"r{k},{name},5,5.05,fill\n" for k, name in enumerate(names))
    )
    limit_mb = limit_tapes * tape_bytes / MB
    cfg = load_config(
        overrides={
            "output.uri": str(tmp_path / "out"),
            "runs_dir": str(tmp_path / "runs"),
            "limits.inputs_memory_mb": limit_mb,
        }
    )
    batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, "tapes")
    batch.sources._cache_bytes = 0  # none kept once no row holds it: what is alive is what rows hold
    try:
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(batch.process, batch.manifest.edits))
    finally:
        batch.close()
    assert [o.status for o in outcomes] == ["succeeded"] * 8, [o.error for o in outcomes]
    assert batch.memory.peak == tape_bytes  # one at a time: one and a half do not fit twice
    assert len(decoded) == 8 and max(alive_at_decode) == 1, alive_at_decode
    assert batch.memory.in_use == 0
    events = [json.loads(line) for line in (tmp_path / "runs" / "tapes" / "journal.jsonl").read_text().splitlines()]
    waited = {e["row"] for e in events if e["event"] == "waiting_for_memory"}
    granted = {e["row"] for e in events if e["event"] == "memory_granted"}
    assert len(waited) >= 4 and waited == granted  # the progress line counts them, then lets them go
    for o, name in zip(outcomes, names, strict=True):
        before, _ = sf.read(tmp_path / name, dtype="int16")
        after, _ = sf.read(o.output, dtype="int16")
        a, b = int(5 * rate), int(5.05 * rate)
        assert np.array_equal(before[:a], after[:a]) and np.array_equal(before[b:], after[b:])
