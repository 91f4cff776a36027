"""What the runs folder (`runs_dir`) holds of runs other than the one starting: results
half-written into the scratch folders of runs that stopped, and results paid for whose
upload failed, kept in runs/<run_id>/unpublished/ for the next run to publish. (The
predictions stopped runs paid for and never used are left_here.py's.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from soundpatch.locks import RunLock
from soundpatch.storage import INDEX_PREFIX

SCRATCH_DIR = "scratch"  # runs/<run_id>/scratch/: results being written (publish.py)


def clear_stopped_runs_scratch(runs_dir: Path) -> tuple[list[str], int]:
    """Remove the scratch folders of runs in `runs_dir` that no process is running (their
    run lock is free: they were killed, and not resumed since). Results there are of no use
    (a run that goes on clears its own and makes them again) and may be gigabytes. Returns
    the runs cleared and the bytes freed."""
    cleared, freed = [], 0
    for scratch in sorted(runs_dir.glob(f"*/{SCRATCH_DIR}")):
        lock = RunLock(scratch.parent)
        try:
            if not lock.take_if_stopped():
                continue  # running (this run's own is held by now)
        except OSError:
            continue  # not ours to touch
        try:
            files = [f for f in scratch.rglob("*") if f.is_file()]
            size = sum(f.stat().st_size for f in files)
            shutil.rmtree(scratch, ignore_errors=True)
            if files:
                cleared.append(scratch.parent.name)
                freed += size
        except OSError:
            continue
        finally:
            lock.release()
    return cleared, freed


def kept_results(runs_dir: Path) -> dict[str, dict]:
    """Index records of results kept in runs/*/unpublished/ after their upload failed."""
    found: dict[str, dict] = {}
    for path in sorted(runs_dir.glob(f"*/unpublished/{INDEX_PREFIX}/*.json")):
        try:
            found[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return found
