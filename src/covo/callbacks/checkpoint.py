"""Checkpoints counted in optimizer steps, however many steps a rollout makes.

Lightning's `every_n_train_steps` is tested once per batch (a rollout) against
`trainer.global_step`: with 8 optimizer steps a rollout and n = 10 it saves at step 40 only,
and a rollout that makes no step can repeat a step already saved. With `save_last: link`,
`last.ckpt` is a link to the newest checkpoint, swapped in one rename, and the checkpoint it
replaces is deleted only once the link points at the new one: a kill at any moment leaves a
`last.ckpt` to resume from.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from covo.algorithms.update import crossed
from covo.infra.resume import partial_path, remove_path


class NamedByStep(ModelCheckpoint):
    """Files named by the optimizer step whose weights they hold (an integer `{step}`)."""

    def _monitor_candidates(self, trainer) -> dict:
        # the module logs `step` (its rollout's first step, a float) as the x axis
        return {**super()._monitor_candidates(trainer), "step": torch.tensor(trainer.global_step)}


class StepCheckpoint(NamedByStep):
    """`ModelCheckpoint` saving after each rollout in which `trainer.global_step` passed a
    multiple of `every_n_steps` (the file's `step` is the step it holds); every other argument
    is Lightning's."""

    def __init__(self, every_n_steps: int, **kwargs):
        super().__init__(every_n_train_steps=0, every_n_epochs=0, **kwargs)
        self.every_n_steps = every_n_steps
        self.step_before = 0
        self.removals: list | None = None  # held back while a save is under way

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not crossed(self.step_before, trainer.global_step, self.every_n_steps):
            return
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self.removals = []
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        removals, self.removals = self.removals, None
        for path in removals:
            super()._remove_checkpoint(trainer, path)

    def _remove_checkpoint(self, trainer, filepath) -> None:
        if self.removals is None:
            super()._remove_checkpoint(trainer, filepath)
        else:
            self.removals.append(filepath)

    @staticmethod
    def _link_checkpoint(trainer, filepath, linkpath) -> None:
        link = Path(linkpath)
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(link):
            written = partial_path(link)
            remove_path(written)
            os.symlink(os.path.relpath(filepath, link.parent), written)
            if link.is_dir() and not link.is_symlink():
                remove_path(link)  # a full last.ckpt folder from before: a rename cannot replace it
            os.replace(written, link)
        trainer.strategy.barrier()


class BestCheckpoint(NamedByStep):
    """The `save_top_k` checkpoints of the best `monitor` (e.g. `val/accuracy`, mode `max`),
    each saved at the end of the validation that measured its weights; every other argument
    is Lightning's."""

    def __init__(self, monitor: str, **kwargs):
        super().__init__(monitor=monitor, every_n_epochs=1, save_on_train_epoch_end=False, **kwargs)
