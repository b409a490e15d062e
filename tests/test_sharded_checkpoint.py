"""FSDP2's folder checkpoints: written whole or not at all, and read back by eval.py and the
Hugging Face export in one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_RUN
from lightning.pytorch.strategies import model_parallel
from transformers import AutoModelForCausalLM

from covo.eval.harness import load_policy_checkpoint
from covo.infra.strategies import fsdp
from covo.models.export import export_checkpoint
from covo.models.loading import build_tiny


def trainer_checkpoint(model: torch.nn.Module, step: int) -> dict:
    """What Lightning hands the strategy: the module's state dict (the policy under `policy.`),
    optimizer states and the trainer's own state."""
    state = {f"policy.{k}": v.clone() for k, v in model.state_dict().items()}
    return {"state_dict": state, "optimizer_states": [], "global_step": step}


def assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_a_folder_checkpoint_is_read_by_eval_and_by_the_export(tmp_path):
    trained = build_tiny(seed=0).model
    expected = {k: v.clone() for k, v in trained.state_dict().items()}
    path = tmp_path / "checkpoints" / "pre_collapse.ckpt"
    fsdp(devices=1).save_checkpoint(trainer_checkpoint(trained, step=7), path)
    assert path.is_dir()  # shards and meta.pt, as FSDP2 writes them

    fresh = build_tiny(seed=1).model
    assert not torch.equal(fresh.lm_head.weight, trained.lm_head.weight)
    assert load_policy_checkpoint(fresh, str(path)) == 7
    assert_same_weights(fresh, expected)

    exported = tmp_path / "hf_model"
    assert export_checkpoint(build_tiny(seed=2), str(path), exported) == 7
    assert_same_weights(AutoModelForCausalLM.from_pretrained(exported), expected)


def test_a_save_killed_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    strategy = fsdp(devices=1)
    path = tmp_path / "last.ckpt"
    first = build_tiny(seed=0).model
    kept = {k: v.clone() for k, v in first.state_dict().items()}
    strategy.save_checkpoint(trainer_checkpoint(first, step=10), path)

    def killed(state: dict, folder) -> None:
        (folder / ".metadata").write_bytes(b"\x80half-written")  # a truncated index
        raise KeyboardInterrupt

    monkeypatch.setattr(model_parallel, "_distributed_checkpoint_save", killed)
    second = build_tiny(seed=3).model
    with pytest.raises(KeyboardInterrupt):
        strategy.save_checkpoint(trainer_checkpoint(second, step=20), path)
    fresh = build_tiny(seed=1).model
    assert load_policy_checkpoint(fresh, str(path)) == 10
    assert_same_weights(fresh, kept)

    monkeypatch.undo()  # the next save completes and replaces it; nothing else is left
    strategy.save_checkpoint(trainer_checkpoint(second, step=20), path)
    assert load_policy_checkpoint(fresh, str(path)) == 20
    assert_same_weights(fresh, second.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_kill_between_the_two_renames_is_recovered_on_load(tmp_path, monkeypatch):
    """The previous folder is set aside as `.last.ckpt.old` before the new one is renamed in:
    a kill right then leaves no `last.ckpt`; loading it (eval, a resume) puts the old one back."""
    strategy = fsdp(devices=1)
    path = tmp_path / "last.ckpt"
    first = build_tiny(seed=0).model
    kept = {k: v.clone() for k, v in first.state_dict().items()}
    strategy.save_checkpoint(trainer_checkpoint(first, step=10), path)
    real_replace, calls = os.replace, []

    def killed_after_the_first_rename(src, dst):
        calls.append(Path(dst).name)
        real_replace(src, dst)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed_after_the_first_rename)
    with pytest.raises(KeyboardInterrupt):
        strategy.save_checkpoint(trainer_checkpoint(build_tiny(seed=3).model, step=20), path)
    monkeypatch.undo()
    assert calls == [".last.ckpt.old"] and not path.exists()
    fresh = build_tiny(seed=1).model
    assert load_policy_checkpoint(fresh, str(path)) == 10
    assert_same_weights(fresh, kept)


@pytest.mark.slow
def test_eval_reads_the_folders_two_fsdp2_processes_write(tmp_path):
    """A 2-step FSDP2 run on 2 gloo processes: its last.ckpt (a link to the newest step's
    folder) holds the weights its export gathered."""
    overrides = [
        *TINY_RUN,
        "strategy=fsdp",
        "reward=self_certainty",
        "callbacks.model_checkpoint.every_n_steps=1",
        f"paths.log_dir={tmp_path}",
    ]
    proc = subprocess.run(
        [sys.executable, "train.py", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (last,) = tmp_path.rglob("checkpoints/last.ckpt")
    (exported,) = tmp_path.rglob("hf_model")
    assert last.is_dir()
    fresh = build_tiny(seed=1).model
    assert load_policy_checkpoint(fresh, str(last)) == 2
    expected = AutoModelForCausalLM.from_pretrained(exported).state_dict()
    assert_same_weights(fresh, expected)
