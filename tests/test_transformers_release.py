"""The model-cache calls under the transformers release GPU images ship (5.17: the keys and
values are `past_key_values`; 5.24, covo's pin: `cache`): the scorer, the rollout's kept
caches and the static engine's tests pass under both (covo.rollout.context_cache.CACHE_NAME).
Slow: it installs transformers 5.17 and a huggingface-hub it accepts from PyPI into a folder
of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OLD = ["transformers==5.17.0", "huggingface-hub>=1.5,<2"]
TESTS = ["tests/test_scoring.py", "tests/test_one_pass.py", "tests/test_rollout.py"]


@pytest.mark.slow
def test_cache_calls_pass_under_transformers_5_17(tmp_path):
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site)]
    installed = subprocess.run([*pip, *OLD], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr.strip().splitlines()[-1]
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT / 'src'}"}
    code = "import transformers, covo.rollout.context_cache as c\n"
    code += "print(transformers.__version__, c.CACHE_NAME)"
    probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert probe.stdout.split() == ["5.17.0", "past_key_values"], probe.stderr
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *TESTS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:]
