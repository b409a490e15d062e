"""One x axis: every logged value, media and callback counts optimizer steps
(trainer.global_step), with several steps a rollout and with rollouts that make none."""

from __future__ import annotations

import csv
from pathlib import Path

from conftest import ConstantOnRollouts
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from covo.launch.train import build


def steps_of(tensorboard_dir: str) -> tuple[dict[str, list[int]], list[int]]:
    events = EventAccumulator(tensorboard_dir)
    events.Reload()
    scalars = {t: [e.step for e in events.Scalars(t)] for t in events.Tags()["scalars"]}
    samples = [e.step for e in events.Tensors("samples/text_summary")]
    return scalars, samples


def test_every_value_and_checkpoint_counts_optimizer_steps(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "reward=self_certainty",  # every response its own reward: no group filtered
        "rollout.num_samples=4",  # 2 prompts x 4 = 8 rows
        "algorithm.mini_batch_size=4",  # 2 mini-batches x 2 epochs: 4 optimizer steps a rollout
        "algorithm.ppo_epochs=2",
        "trainer.max_steps=16",
        "callbacks.model_checkpoint.every_n_steps=6",
        "callbacks.model_checkpoint.save_last=false",
        "module.samples_every_n_steps=5",
        "val_every_n_rollouts=2",
        "export_dir=null",
    )
    with open_dict(cfg):
        cfg.logger.csv = {
            "_target_": "lightning.pytorch.loggers.CSVLogger",
            "save_dir": str(tmp_path),
            "name": "csv",
            "version": "",
        }
    module, datamodule, trainer = build(cfg)
    # every group of rollout 1 all-zero: filtered, no step
    module.reward = ConstantOnRollouts(module.reward, rollouts={1}, value=0.0)
    trainer.fit(module, datamodule=datamodule)
    # rollouts (step before -> after): 0->4, 4->4 (filtered), 4->8, 8->12, 12->16
    assert trainer.global_step == 16
    scalars, samples = steps_of(trainer.loggers[0].log_dir)
    starts = [0, 4, 4, 8, 12]  # each rollout's values sit at the step it began at
    assert scalars["reward/mean"] == starts
    assert scalars["collapse/alarm"] == starts
    assert scalars["train/loss"] == [0, 4, 8, 12]  # the filtered rollout trained nothing
    # validation after rollouts 2 and 4 (the 2nd and 4th batches), at the step it measured
    assert scalars["val/accuracy"] == [4, 12]
    # a multiple of 5 passed at steps 0, 8 (5), 12 (10); not on step 16's rollout (none run)
    assert samples == [0, 8, 12]
    # a multiple of 6 passed by the rollouts 4->8 (6) and 8->12 (12); none by 12->16
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.ckpt"))
    assert ckpts == ["step_000008.ckpt", "step_000012.ckpt"]
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["reward/mean"]] == starts
    assert [int(r["step"]) for r in rows if r["val/accuracy"]] == [4, 12]
    assert Path(cfg.paths.output_dir) == tmp_path
