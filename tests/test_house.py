"""Structure the project promises: the core is plain Python, Prefect stays in flows/ and tasks/."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "soundpatch"


def test_the_core_never_imports_prefect():
    offenders = [
        str(p.relative_to(CORE.parent))
        for p in CORE.rglob("*.py")
        if re.search(r"^\s*(import prefect|from prefect)", p.read_text(), re.M)
    ]
    assert offenders == []


def test_validating_a_manifest_does_not_load_prefect():
    code = "import sys, soundpatch.cli, soundpatch.batch; print('prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
