"""Two `soundpatch run` processes on the same work at once: nothing is paid for twice.

The same run id twice (a second terminal, a flow run retried while its first worker still
runs): the second is refused at once. Two run ids over the same rows (overlapping
manifests run side by side): each edit is made by one of them and reused by the other.
"""

from __future__ import annotations

import pytest

from tests.jobs import environment, events, finish, finish_every_row, kill_group, report, start, wait_for, write_job


def test_a_run_already_going_is_refused_and_is_free_again_once_its_process_is_gone(
    job_dir, aws_env, simulator, tmp_path_factory
):
    sim = simulator(latency=30.0, fill="tone")
    write_job(job_dir, sim, aws_env, rows=3, concurrency=3)
    env = environment(tmp_path_factory.mktemp("prefect"))
    first = start(job_dir, env, "busy")
    wait_for(lambda: len(events(job_dir, "busy", "created")) == 3, 90, "three acknowledged creates")

    second = finish(job_dir, env, "busy")
    assert second.returncode == 2, second.stdout + second.stderr
    assert "Run busy is already going (process" in second.stderr and "Traceback" not in second.stderr
    assert sim.stats.creates == 3  # it sent nothing

    kill_group(first)  # kill -9: the kernel lets go of the lock with the process
    sim.settings.latency = 0.3
    finish_every_row(job_dir, env, "busy", 3)
    assert sim.stats.creates == 3


def test_two_runs_over_the_same_rows_at_once_pay_for_each_edit_once(job_dir, aws_env, simulator, tmp_path_factory):
    sim = simulator(latency=4.0, fill="tone")
    write_job(job_dir, sim, aws_env, rows=8, concurrency=8)
    env = environment(tmp_path_factory.mktemp("prefect"))
    runs = {run_id: start(job_dir, env, run_id) for run_id in ("one", "two")}
    for run_id, proc in runs.items():
        out, err_text = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{run_id}: {out}{err_text}"
    one, two = report(job_dir, "one"), report(job_dir, "two")
    assert sim.stats.accepted == 8
    for row in range(8):  # made by one run, reused by the other
        assert sorted([one["status"][row], two["status"][row]]) == ["skipped_done", "succeeded"]
    assert one["cost_usd"].sum() + two["cost_usd"].sum() == pytest.approx(8 * 0.20)


def test_two_runs_sending_the_same_clip_for_other_spans_at_once_pay_for_it_once(
    job_dir, aws_env, simulator, tmp_path_factory
):
    # Two restorers (or two workers of one archive) mend the same passage side by side, one
    # of them with a click more in its spans: the model is sent the same clip either way, so
    # one run pays for it and the other splices the answer it kept, however they overlap.
    sim = simulator(latency=3.0, fill="tone")
    write_job(job_dir, sim, aws_env, rows=0, concurrency=2)
    row = "id,input,start,end,damaged,prompt,seed\nfx,fx.wav,1.0,1.5,{},clean continuation,7\n"
    (job_dir / "one.csv").write_text(row.format("1.1-1.11"))
    (job_dir / "two.csv").write_text(row.format("1.1-1.11 1.3-1.305"))
    env = environment(tmp_path_factory.mktemp("prefect"))
    runs = {name: start(job_dir, env, name, f"{name}.csv") for name in ("one", "two")}
    for name, proc in runs.items():
        out, err_text = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{name}: {out}{err_text}"
    one, two = report(job_dir, "one"), report(job_dir, "two")
    assert list(one["status"]) == list(two["status"]) == ["succeeded"]
    assert sim.stats.creates == 1
    assert sorted([one["cost_usd"][0], two["cost_usd"][0]]) == pytest.approx([0.0, 0.20])
    assert one["prediction_id"][0] == two["prediction_id"][0]
    assert {one["damaged"][0], two["damaged"][0]} == {"1.09-1.12", "1.09-1.12 1.29-1.315"}
