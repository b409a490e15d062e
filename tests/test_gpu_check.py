"""scripts/gpu_check.sh as far as a CPU allows: it refuses without a GPU, and every command of
its dry run composes a valid run (train.py, bench_memory.py) or names options the script has."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, compose_config

from covo.launch.settings import check_train
from covo.launch.train import resolve_auto

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "scripts"))
import bench_memory  # noqa: E402


def run(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_DIR": str(tmp_path / "work")}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_a_gpu_it_refuses_in_one_line(tmp_path):
    (tmp_path / "wheels").mkdir()
    out = run(str(tmp_path / "wheels"), str(tmp_path / "report.md"), tmp_path=tmp_path)
    assert out.returncode == 3
    assert out.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is false): run it on a GPU"
        " machine"
    ]
    assert not (tmp_path / "report.md").exists()


def test_it_refuses_a_missing_wheels_folder_and_needs_one(tmp_path):
    out = run(str(tmp_path / "absent"), tmp_path=tmp_path)
    assert out.returncode == 2 and "WHEELS_DIR" in out.stderr
    assert run(tmp_path=tmp_path).returncode == 2


def test_the_dry_run_commands_compose_valid_runs(tmp_path):
    out = run(str(tmp_path / "wheels"), "--dry-run", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(line) for line in out.stdout.splitlines() if not line.startswith("#")]
    assert len(commands) == 5
    install, default, fsdp, generate, memory = commands
    assert install[1:6] == ["-m", "pip", "install", "--no-index", "--no-deps"]
    assert "--target" in install and install[-1] == f"{tmp_path / 'wheels'}/*.whl"
    for command in (default, fsdp):
        assert command[:2] == [sys.executable, "train.py"]
        cfg = compose_config("train", command[2:], tmp_path / "out")
        resolve_auto(cfg)
        check_train(cfg)  # every setting valid, as the run would check it
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.strategy._target_ == "covo.infra.strategies.fsdp" and cfg.trainer.devices == 1
    # bench_memory composes the default variant's short run with the overrides after its own
    assert memory[1] == "scripts/bench_memory.py"
    overrides = memory[memory.index("--json") + 2 :]
    cfg = compose_config(
        "train", ["trainer.max_steps=8", *bench_memory.SHORT_RUN, *overrides], tmp_path / "m"
    )
    resolve_auto(cfg)
    check_train(cfg)
    assert cfg.rollout.max_new_tokens == 2048 and cfg.algorithm.mini_batch_size == 4
    # 2 prompts x 16 samples / 4 per mini-batch: the recipe's 8 optimizer steps a rollout
    assert cfg.data.batch_size * cfg.rollout.num_samples // cfg.algorithm.mini_batch_size == 8
    assert generate[1] == "scripts/bench_generate.py"
    help_text = subprocess.run(
        [sys.executable, "scripts/bench_generate.py", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    ).stdout
    for option in (a for a in generate[2:] if a.startswith("--")):
        assert option in help_text, option


def test_the_memory_estimate_scales_by_parameter_count():
    # 100 M fp32 parameters (400 MB), a 1000 MiB peak: x 76.2 for Qwen2.5-7B's 7.62 B
    row = {
        "variant": "default",
        "device": "cuda",
        "peak": 1000 * 2**20,
        "params_trained": 4e8,
        "params_frozen": 0,
        "reference_copy": 2e8,
        "replica": 2e8,
        "grads": 4e8,
        "optimizer_state": 8e8,
    }
    text = bench_memory.scaled_to_7b([row])
    # 1000 MiB x 76.2 = 79.9 GB; (0.4 + 0.2 + 0.2 + 0.4 + 0.8) GB x 76.2 = 152 GB
    assert "scaled by 7.62 B / 100.0 M = 76.2: 80 GB" in text
    assert "by 8): 152 GB" in text
