"""Checkpoints counted in optimizer steps, however many steps a rollout makes.

Lightning's `every_n_train_steps` is tested once per batch (a rollout) against
`trainer.global_step`: with 8 optimizer steps a rollout and n = 10 it saves at step 40 only,
and a rollout that makes no step can repeat a step already saved.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from covo.algorithms.update import crossed


class StepCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` saving after each rollout in which `trainer.global_step` passed a
    multiple of `every_n_steps` (the file's `step` is the step it holds); every other argument
    is Lightning's."""

    def __init__(self, every_n_steps: int, **kwargs):
        super().__init__(every_n_train_steps=0, every_n_epochs=0, **kwargs)
        self.every_n_steps = every_n_steps
        self.step_before = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not crossed(self.step_before, trainer.global_step, self.every_n_steps):
            return
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def _monitor_candidates(self, trainer) -> dict:
        # the module logs `step` (its rollout's first step) as the x axis: the file is named
        # by the step whose weights it holds
        return {**super()._monitor_candidates(trainer), "step": torch.tensor(trainer.global_step)}
