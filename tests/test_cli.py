"""The command line as a user types it."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT
from omegaconf import OmegaConf


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
    # what each job ran, as its own composed config says (not the names Hydra gave the folders)
    component = {  # the reward component each class logs: the job scored with that class
        "covo.rewards.ground_truth.GroundTruthReward": "reward/correct",
        "covo.rewards.majority.MajorityReward": "reward/majority_share",
    }
    ran = []
    for job in job_dirs:
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        trained = OmegaConf.load(job / "config.yaml")  # what train() was given
        assert (trained.reward._target_, trained.seed) == (cfg.reward._target_, cfg.seed), job
        ran.append((cfg.reward._target_, cfg.seed))
        header = (job / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
        assert component[cfg.reward._target_] in header, job
        assert not set(component.values()) - {component[cfg.reward._target_]} & set(header), job
    assert sorted(ran) == [
        ("covo.rewards.ground_truth.GroundTruthReward", 0),
        ("covo.rewards.ground_truth.GroundTruthReward", 1),
        ("covo.rewards.majority.MajorityReward", 0),
        ("covo.rewards.majority.MajorityReward", 1),
    ]


def test_console_counts_steps_and_says_where_the_config_went(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "debug=default",
            "trainer.max_steps=3",
            f"paths.log_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "train steps: 100%" in out and "3/3" in out
    assert "Epoch 0/-2" not in out
    noises = ["LeafSpec", "in eval mode", "manual optimization", "not resumable"]
    # Lightning's notices about Lightning: what this machine lacks, a product tip
    noises += ["GPU available", "TPU available", "Tip:", "Training:", "Validation"]
    for noise in noises:
        assert noise not in out, noise
    # one bar: every render of it says what it counts
    renders = [part for part in re.split(r"[\r\n]", out) if "%|" in part]
    assert renders and all(part.startswith("train steps:") for part in renders)
    assert "precision: " in out  # the run says which precision it picked
    (run,) = (tmp_path / "debug" / "runs").iterdir()
    assert "overrides: debug=default trainer.max_steps=3" in out
    assert f"config: {run / 'config.yaml'}" in out
    assert "max_steps: 3" in (run / "config.yaml").read_text()
