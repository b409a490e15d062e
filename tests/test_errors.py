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


def test_a_bad_setting_is_one_line_and_exit_2(tmp_path):
    proc = run_train("rollout.temperature=-1", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "error: rollout.temperature=-1: expected a number >= 0 (0 = greedy)\n"


@pytest.mark.parametrize(
    "override, line",
    [
        (
            "max_grad_norm=0.5",
            "error: max_grad_norm is now module.max_grad_norm: max_grad_norm=0.5 ->"
            " module.max_grad_norm=0.5 (docs/configuration.md: Renamed keys)",
        ),
        (
            "+val_extractor=boxed",
            "error: val_extractor is now module.val_extractor: +val_extractor=boxed ->"
            " module.val_extractor=boxed (docs/configuration.md: Renamed keys)",
        ),
    ],
)
def test_a_key_that_moved_into_module_names_its_new_key(override, line, tmp_path):
    proc = run_train(override, tmp_path=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == line + "\n"
    assert not list(tmp_path.iterdir())  # refused before Hydra made a run directory


BROKEN_METRIC = """
import runpy, sys
import covo.metrics.step

def reward_metrics(*args, **kwargs):
    raise KeyError("diag/accuracy")

covo.metrics.step.reward_metrics = reward_metrics
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_a_bug_inside_fit_keeps_its_traceback_on_screen_and_in_the_run_log(tmp_path):
    """A KeyError raised by a metric during `trainer.fit` is a bug, not a config error."""
    base = [o for o in TINY_RUN if not o.startswith("trainer.max_steps")]
    proc = subprocess.run(
        [sys.executable, "-c", BROKEN_METRIC, *base, "trainer.max_steps=1", "callbacks=none",
         "logger=none", "threads=1", f"paths.log_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode not in (0, 2)
    assert "Traceback" in proc.stderr
    assert "KeyError: 'diag/accuracy'" in proc.stderr
    assert "error: 'diag/accuracy'" not in proc.stderr
    (log_file,) = tmp_path.glob("train/runs/*/train.log")
    logged = log_file.read_text()
    assert "Traceback (most recent call last)" in logged
    assert "in reward_metrics" in logged and "KeyError: 'diag/accuracy'" in logged
