"""What a run keeps on disk: the 7B recipe's checkpoints are bounded, and `last.ckpt` is a link
to the newest step's checkpoint, not a second write."""

from __future__ import annotations

import os

import hydra
import torch
from conftest import compose_config
from omegaconf import OmegaConf

from covo.launch.train import train

GUARD_FILES = 2  # last_healthy.ckpt and pre_collapse.ckpt


def kept_checkpoints(callbacks: dict) -> float:
    """The most full checkpoints the configured callbacks keep at once (inf: unbounded)."""
    kept = 0.0
    for node in callbacks.values():
        if node.get("save_pre_collapse"):
            kept += GUARD_FILES
        if "save_top_k" in node:
            kept += float("inf") if node["save_top_k"] < 0 else node["save_top_k"]
            kept += node.get("save_last") is True  # "link": no file of its own
    return kept


def test_the_7b_recipe_keeps_at_most_five_checkpoints(tmp_path):
    # what `python train.py experiment=covo_released_qwen7b --cfg job` prints
    cfg = compose_config("train", ["experiment=covo_released_qwen7b"], tmp_path)
    callbacks = OmegaConf.to_container(cfg.callbacks)
    # the newest step's, the best by val/accuracy, the collapse guard's two
    assert kept_checkpoints(callbacks) == 4
    assert callbacks["model_checkpoint"]["save_last"] == "link"
    assert callbacks["best_checkpoint"]["monitor"] == "val/accuracy"
    for name in ("model_checkpoint", "best_checkpoint"):
        node = {**callbacks[name], "dirpath": "unused"}
        assert hydra.utils.instantiate(node).save_top_k == 1


def test_last_links_to_the_newest_step_and_older_steps_are_deleted(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "trainer.max_steps=2",
        "export_dir=null",
        "logger=none",
        "callbacks.model_checkpoint.every_n_steps=1",
        "callbacks.model_checkpoint.save_top_k=1",
        "callbacks.model_checkpoint.save_last=link",
        "callbacks.collapse_guard.save_pre_collapse=false",
    )
    train(cfg)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step_000002.ckpt"]
    assert os.readlink(folder / "last.ckpt") == "step_000002.ckpt"
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 2
