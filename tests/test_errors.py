"""Bad input ends `python train.py` with one line naming the problem, and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_RUN


def run_train(*overrides: str, tmp_path) -> subprocess.CompletedProcess:
    base = [o for o in TINY_RUN if not o.startswith("data.train") and not o.startswith("data.val")]
    return subprocess.run(
        [sys.executable, "train.py", *base, f"paths.log_dir={tmp_path}", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture
def jsonl(tmp_path):
    def write(lines: list[str]):
        path = tmp_path / "data.jsonl"
        path.write_text("\n".join(lines))
        return path

    return write


def test_malformed_line_names_file_and_line(jsonl, tmp_path):
    path = jsonl([json.dumps({"problem": "1+1", "answer": "2"}), '{"problem": "2+2", '])
    proc = run_train("data=jsonl", f"data.train.path={path}", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert (
        last_line(proc) == f"error: {path}:2: malformed JSON (Expecting property name "
        "enclosed in double quotes)"
    )


def test_missing_key_names_the_key(jsonl, tmp_path):
    path = jsonl([json.dumps({"problem": "1+1", "answer": "2"}), json.dumps({"question": "x"})])
    proc = run_train("data=jsonl", f"data.train.path={path}", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert last_line(proc) == f"error: {path}:2: missing key 'problem'"


def test_wrong_model_path(tmp_path):
    proc = run_train("model=hf", "model.name_or_path=/no/such/model", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert last_line(proc) == "error: model path not found: /no/such/model"


def test_unknown_reward_name(tmp_path):
    proc = run_train("reward=no_such_reward", tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'reward/no_such_reward'" in proc.stderr
