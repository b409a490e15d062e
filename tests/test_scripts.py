"""Every script under scripts/ imports: a helper it calls that moved or was renamed fails here,
not in the middle of a benchmark."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_every_script_imports():
    names = sorted(p.stem for p in SCRIPTS.glob("*.py"))
    assert "bench_toy_step" in names and len(names) > 10
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)"
    done = subprocess.run(
        [sys.executable, "-c", code, *names], cwd=SCRIPTS, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1]
