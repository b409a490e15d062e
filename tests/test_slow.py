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


def test_compare_a_tiny_seed_sweep(tmp_path):
    def python(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    sweep = ["-m", "debug=default", "reward=covo,majority", "seed=0,1,2", "trainer.max_steps=2"]
    python("train.py", *sweep, "val_every_n_rollouts=1", "threads=1", f"paths.log_dir={tmp_path}")
    (sweep,) = (tmp_path / "debug" / "multiruns").iterdir()
    lines = python("-m", "covo.report", "--compare", str(sweep)).splitlines()
    assert lines[3] == "| metric | reward=covo (3 seeds) | reward=majority (3 seeds) |"
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines if "|" in line}
    assert {"val/accuracy final", "val/accuracy best", "diag/reward_accuracy (mean)"} <= set(rows)
    # majority's verdict is "is the majority cluster": its reward accuracy is the majority's
    assert rows["diag/reward_accuracy (mean)"][1] == rows["diag/majority_reward_accuracy (mean)"][1]
    assert lines[-1] == "reward=covo: seeds 0, 1, 2; reward=majority: seeds 0, 1, 2"
