"""Long runs: the real default model, and several processes. `pytest -m slow`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY_RUN
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.slow


def run(*overrides: str, log_dir: Path, timeout: int = 1500) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "train.py", f"paths.log_dir={log_dir}", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def scalar_steps(log_dir: Path, tag: str) -> list[int]:
    (events_dir,) = {p.parent for p in log_dir.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events_dir))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_default_model_two_steps(tmp_path):
    run("trainer.max_steps=2", "callbacks=none", "export_dir=null", log_dir=tmp_path)
    assert scalar_steps(tmp_path, "reward/mean") == [0, 1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes(strategy, tmp_path):
    proc = run(*TINY_RUN, f"strategy={strategy}", "reward=self_certainty", log_dir=tmp_path)
    assert scalar_steps(tmp_path, "train/grad_norm") == [0, 1]
    assert "MEMBER: 2/2" in proc.stderr + proc.stdout  # the second process joined
    exported = list(tmp_path.rglob("hf_model/config.json"))
    assert len(exported) == 1
