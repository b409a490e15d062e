"""The collapse guard: label-free signals per rollout under `collapse/`, and an alarm on collapse.

It reads what the module logged for the rollout (`trainer.callback_metrics`), logs each signal
as `collapse/<name>` with its least-squares slope over the window (`collapse/<name>_trend`),
the number of rules met (`collapse/rules_met`) and `collapse/alarm` (0/1), at the optimizer
step the rollout began at, like every logged value. It keeps the weights after an unsaturated
rollout, at most once every `window_rollouts` rollouts (at 7B each write is 15-30 GB): the
window's rollouts are saturated, so the kept weights always precede the window. When the alarm
first goes up they become `pre_collapse.ckpt`, one warning line names the rules that held, and
with `stop_on_alarm` the run stops after this rollout.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.callbacks import Callback

from covo.callbacks.collapse import ALARM, KEEP, CollapseWatch, Verdict

log = logging.getLogger(__name__)

# collapse/<name> <- the metric the module logs for it
SIGNALS = {
    "answer_entropy": "rollout/answer_entropy",
    "top_answer_share": "rollout/top_answer_share",
    "distinct_answers": "rollout/distinct_answers",
    "len_mean": "rollout/len_mean",
    "token_entropy": "train/entropy",
    "self_certainty": "rollout/self_certainty",
    "zero_var_frac": "reward/zero_var_frac",
    "kl": "train/kl",
}
HEALTHY = "last_healthy.ckpt"
PRE_COLLAPSE = "pre_collapse.ckpt"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


class CollapseGuard(Callback):
    """`rules` maps a signal to `{above|below|drop|rise: value}` (`covo.callbacks.collapse.Rule`); a
    rollout is saturated when `min_rules` of them hold, the alarm needs `window_rollouts`
    saturated rollouts in a row; relative rules compare with the mean of a signal's first
    `baseline_rollouts` values (`covo.callbacks.collapse.CollapseWatch` decides)."""

    def __init__(
        self,
        rules: dict,
        min_rules: int = 2,
        window_rollouts: int = 3,
        baseline_rollouts: int = 3,
        stop_on_alarm: bool = False,
        save_pre_collapse: bool = True,
        save_weights_only: bool = True,
        dirpath: str | None = None,
        signals: dict[str, str] | None = None,
    ):
        self.watch = CollapseWatch(
            rules,
            SIGNALS if signals is None else signals,
            min_rules,
            window_rollouts,
            baseline_rollouts,
            save_pre_collapse,
        )
        self.stop_on_alarm = stop_on_alarm
        self.save_weights_only = save_weights_only
        self.dirpath = dirpath
        self.rollout_step = 0

    def checkpoint_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rollout_step = trainer.global_step  # the step the module logs this rollout at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logged, verdict, action = self.watch.observe(trainer.callback_metrics)
        pl_module.log_rollout(logged)
        if action == ALARM:
            self.raise_alarm(trainer, self.rollout_step, verdict)
        elif action == KEEP:
            self.watch.healthy_step = trainer.global_step
            path = self.checkpoint_dir(trainer) / HEALTHY
            trainer.save_checkpoint(path, weights_only=self.save_weights_only)

    def raise_alarm(self, trainer: L.Trainer, step: int, verdict: Verdict) -> None:
        watch = self.watch
        watch.alarm_step = step
        folder = self.checkpoint_dir(trainer)
        kept = "none (no step before the window was kept)"
        # rank 0 writes the checkpoints and decides: on nodes without a shared disk the
        # other ranks do not see the file, and a barrier some ranks skip hangs the others
        exists = trainer.is_global_zero and (folder / HEALTHY).exists()
        if watch.healthy_step is not None and trainer.strategy.broadcast(exists, src=0):
            if trainer.is_global_zero:
                _remove(folder / PRE_COLLAPSE)
                os.replace(folder / HEALTHY, folder / PRE_COLLAPSE)
            trainer.strategy.barrier("collapse_guard")
            kept = f"{folder / PRE_COLLAPSE} (step {watch.healthy_step})"
        if trainer.is_global_zero:
            log.warning(watch.alarm_line(step, verdict, kept, self.stop_on_alarm))
        if self.stop_on_alarm:
            trainer.should_stop = True

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            _remove(self.checkpoint_dir(trainer) / HEALTHY)

    def state_dict(self) -> dict:
        return self.watch.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.watch.load_state_dict(state_dict)
