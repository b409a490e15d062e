"""The command line as a user types it."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_multirun_gives_each_job_its_own_directory(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "debug=default",
            "reward=ground_truth,majority",
            "seed=0,1",
            "trainer.max_steps=1",
            "logger=csv",
            f"paths.log_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    job_dirs = [p for p in (tmp_path / "debug" / "multiruns").glob("*/*") if p.is_dir()]
    jobs = sorted(p.name for p in job_dirs)
    assert jobs == [
        "0_reward=ground_truth,seed=0",
        "1_reward=ground_truth,seed=1",
        "2_reward=majority,seed=0",
        "3_reward=majority,seed=1",
    ]
    for job in job_dirs:
        assert (job / "csv" / "metrics.csv").exists(), job
