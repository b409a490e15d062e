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


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def train_overrides(command: list[str], tmp_path) -> list[str]:
    """A training step's overrides: what follows `train.py`, up to a redirection."""
    wrapper = str(tmp_path / "work" / "with_memory.py")
    assert command[:3] == [sys.executable, wrapper, "train.py"]
    rest = command[3:]
    return rest[: rest.index(">")] if ">" in rest else rest


def test_the_dry_run_commands_compose_valid_runs(tmp_path):
    out = run(str(tmp_path / "wheels"), "--dry-run", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    names = [line[2:].rsplit(" (timeout", 1)[0] for line in lines if line.startswith("#")]
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    assert len(commands) == len(names) == 11
    steps = dict(zip(names, commands))
    install, generate, memory = steps.pop("install"), *[steps.pop(n) for n in names[-2:]]
    assert install[1:6] == ["-m", "pip", "install", "--no-index", "--no-deps"]
    assert "--target" in install and install[-1] == f"{tmp_path / 'wheels'}/*.whl"
    cfgs = {}
    for name, command in steps.items():
        cfg = compose_config("train", train_overrides(command, tmp_path), tmp_path / "out")
        resolve_auto(cfg)
        check_train(cfg)  # every setting valid, as the run would check it
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
        cfgs[name] = cfg
    fsdp = cfgs["strategy=fsdp, 1 GPU"]
    assert fsdp.strategy._target_ == "covo.infra.strategies.fsdp" and fsdp.trainer.devices == 1
    qwen = {name: cfg for name, cfg in cfgs.items() if name.startswith("qwen 0.5B")}
    assert len(qwen) == 6
    for cfg in qwen.values():
        assert cfg.model._target_ == "covo.models.loading.load_qwen_coder_05b"
        assert cfg.model.cache_dir == str(tmp_path / "work" / "models")
    saved = qwen["qwen 0.5B: 2 steps, a checkpoint each"]
    resumed = qwen["qwen 0.5B: resume from last.ckpt"]
    saved_dir = [o for o in steps["qwen 0.5B: 2 steps, a checkpoint each"] if "output_dir=" in o]
    assert resumed.ckpt_path == saved_dir[0].split("=", 1)[1] + "/checkpoints/last.ckpt"
    assert resumed.trainer.max_steps > saved.trainer.max_steps
    assert saved.callbacks.model_checkpoint.every_n_steps == 1
    heldout = qwen["qwen 0.5B: callbacks=heldout_eval"].callbacks.heldout_eval
    assert heldout._target_ == "covo.callbacks.heldout_eval.HeldoutEval"
    lora, lora_fsdp = qwen["qwen 0.5B: LoRA"], qwen["qwen 0.5B: LoRA + strategy=fsdp"]
    assert lora.model.lora.r == lora_fsdp.model.lora.r == 8
    assert lora.strategy._target_ != lora_fsdp.strategy._target_ == "covo.infra.strategies.fsdp"
    static = qwen["qwen 0.5B: static + compiled engine, no fallback"]
    assert static.rollout.engine.cache == "static" and static.rollout.engine.compile
    checked = steps["qwen 0.5B: static + compiled engine, no fallback"]
    assert checked[-5:] == [
        "--fallback-in",
        str(tmp_path / "work" / "static.log"),
        "&&",
        "exit",
        "$rc",
    ]
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


def test_every_step_runs_under_timeout_with_a_kill():
    assert 'timeout -k 30 "$limit" bash -c "$cmd"' in SCRIPT.read_text()


def test_the_fallback_check_finds_the_engines_own_warning(tmp_path, caplog, monkeypatch):
    """The line the rollout engine logs when its static cache + compile fails, as in a log."""
    from torch._dynamo.exc import InternalTorchDynamoError
    from transformers import StaticCache

    from covo.models.loading import build_tiny
    from covo.rollout.engine import HFGenerate
    from covo.rollout.sampling import encode_prompts

    def fails(*args, **kwargs):
        raise InternalTorchDynamoError("no CUDA graphs here")

    monkeypatch.setattr(StaticCache, "update", fails)
    tiny = build_tiny()
    encoded = encode_prompts(tiny.tokenizer, ["What is 12 + 7?"], "cpu")
    with caplog.at_level("WARNING", logger="covo.rollout.engine"):
        HFGenerate("static", compile=True)(tiny.model, tiny.tokenizer, encoded, 2, 4, 1.0, 1.0)
    (warning,) = [r for r in caplog.records if r.name == "covo.rollout.engine"]
    fell_back = tmp_path / "fell_back.log"
    fell_back.write_text(
        f"step 1\n[covo.rollout.engine][WARNING] - {warning.getMessage()}\nstep 2\n"
    )
    clean = tmp_path / "clean.log"
    clean.write_text("step 1\nrollout/len_mean 12.0\ngpu memory: max allocated 1.00 GiB\n")
    found = run("--fallback-in", str(fell_back), tmp_path=tmp_path)
    assert found.returncode == 1 and "InternalTorchDynamoError" in found.stdout
    assert run("--fallback-in", str(clean), tmp_path=tmp_path).returncode == 0
