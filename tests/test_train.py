"""End-to-end runs of `train(cfg)` on the tiny model."""

from __future__ import annotations

from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from covo.train import build, train

STEP_TAGS = [
    "reward/mean",
    "reward/std",
    "diag/accuracy",
    "rollout/len_mean",
    "rollout/truncated_frac",
    "train/loss",
    "train/kl",
    "train/entropy",
    "train/clip_frac",
    "train/grad_norm",
    "train/lr",
    "time/rollout_s",
    "time/reward_s",
    "time/update_s",
    "perf/tokens_per_s",
]


def scalars(tensorboard_dir: str) -> dict[str, list[float]]:
    events = EventAccumulator(tensorboard_dir)
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_one_step_changes_policy_not_reference(tiny_cfg):
    # self-certainty gives every response a different reward, so no group is filtered out
    cfg = tiny_cfg("reward=self_certainty", "trainer.max_steps=1", "callbacks=none", "logger=none")
    module, datamodule, trainer = build(cfg)
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    reference = {k: v.clone() for k, v in module.reference.state_dict().items()}
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1
    changed = [k for k, v in module.policy.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)
    for k, v in module.reference.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_train_logs_checkpoints_exports_and_resumes(tiny_cfg, tmp_path):
    cfg = tiny_cfg("reward=self_certainty", "callbacks.model_checkpoint.every_n_train_steps=1")
    out = train(cfg)
    values = scalars(out["tensorboard_dir"])
    for tag in STEP_TAGS:
        assert tag in values, tag
        assert len(values[tag]) == 2, tag
        assert all(torch.isfinite(torch.tensor(values[tag]))), tag
    assert 0.0 <= values["diag/accuracy"][-1] <= 1.0
    assert values["train/lr"][0] > 0

    ckpts = Path(out["output_dir"]) / "checkpoints"
    assert (ckpts / "last.ckpt").exists()
    assert not [
        k
        for k in torch.load(ckpts / "last.ckpt", weights_only=False)["state_dict"]
        if k.startswith("reference.")
    ]

    exported = AutoModelForCausalLM.from_pretrained(out["export_dir"])
    trained = torch.load(ckpts / "last.ckpt", weights_only=False)["state_dict"]
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(exported.state_dict()[name], trained[f"policy.{name}"])

    resumed_cfg = tiny_cfg(
        "reward=self_certainty",
        "trainer.max_steps=3",
        f"ckpt_path={ckpts / 'last.ckpt'}",
        "export_dir=null",
    )
    resumed_cfg.paths.output_dir = str(tmp_path / "resumed")
    module, datamodule, trainer = build(resumed_cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resumed_cfg.ckpt_path)
    assert trainer.global_step == 3


def test_every_estimator_trains(tiny_cfg):
    for algorithm in ("grpo", "rloo"):
        cfg = tiny_cfg(
            f"algorithm={algorithm}",
            "reward=entropy",
            "trainer.max_steps=1",
            "callbacks=none",
            "logger=none",
            "export_dir=null",
        )
        out = train(cfg)
        assert out["metrics"]["train/grad_norm"] > 0, algorithm
