"""covo's collapse guard as a callback of TRL's trainer: the rules, signals, window and alarm of
`callbacks.collapse_guard` (conf/callbacks/default.yaml), decided by the same
`covo.callbacks.collapse.CollapseWatch` as in covo's trainer.

It reads each log of a training step that holds a covo reward's metrics (`reward/mean`): the
answer agreement and token entropy the reward computed for the step's rollout, TRL's
`completions/mean_length` and, where `beta > 0`, TRL's `kl`. With `logging_steps=1` an
observation is one optimizer step, which with TRL's default `steps_per_generation` is one
rollout. Its `collapse/...` values join that log (the guard runs before the trainer's other
callbacks). After an unsaturated step it keeps the weights (`save_pretrained`: the adapters
only under peft) in `<output_dir>/last_healthy`, at most once every `window_rollouts`
observations; when the alarm first goes up that folder becomes `pre_collapse`, one warning
line names the rules that held, and with `stop_on_alarm` training stops after the step.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig
from transformers import TrainerCallback

from covo.callbacks.collapse import ALARM, KEEP, CollapseWatch
from covo.callbacks.collapse_guard import SIGNALS as TRAINER_SIGNALS
from covo.infra.checks import BOOL, apply_rules

log = logging.getLogger(__name__)

# collapse/<name> <- the metric in TRL's log (the covo reward logs covo's names)
SIGNALS = {**TRAINER_SIGNALS, "len_mean": "completions/mean_length", "kl": "kl"}
ROLLOUT_METRIC = "reward/mean"  # a log holding it saw a covo reward's rollout
HEALTHY, PRE_COLLAPSE = "last_healthy", "pre_collapse"
KEYS = ("stop_on_alarm", "min_rules", "window_rollouts", "baseline_rollouts", "save_pre_collapse")


class CollapseGuardCallback(TrainerCallback):
    """covo's collapse guard in a `transformers.Trainer`: `rules` and `watch`'s knobs
    (`min_rules`, `window_rollouts`, `baseline_rollouts`, `save_pre_collapse`) as in
    `covo.callbacks.collapse.CollapseWatch`; the weights are kept under `dirpath` (None: the
    trainer's `output_dir`)."""

    def __init__(
        self, rules: dict, stop_on_alarm: bool = False, dirpath: str | None = None, **watch
    ):
        self.watch = CollapseWatch(rules, SIGNALS, **watch)
        self.stop_on_alarm = stop_on_alarm
        self.dirpath = dirpath

    @classmethod
    def from_config(cls, node: DictConfig) -> CollapseGuardCallback:
        """From a `callbacks.collapse_guard` node; its checkpoint keys (`dirpath`,
        `save_weights_only`, `_target_`) are covo's trainer's: TRL's `output_dir` is used."""
        prefix = "callbacks.collapse_guard."
        apply_rules(node, [("stop_on_alarm", *BOOL), ("save_pre_collapse", *BOOL)], prefix)
        return cls(dict(node.rules), **{key: node[key] for key in KEYS})

    def folder(self, args) -> Path:
        return Path(self.dirpath or args.output_dir)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs or ROLLOUT_METRIC not in logs:
            return control
        watch = self.watch
        logged, verdict, action = watch.observe(logs)
        logs.update(logged)  # the callbacks after this one report it
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(logged)
        folder, main = self.folder(args), state.is_world_process_zero
        if action == KEEP:
            watch.healthy_step = state.global_step
            if main:
                model.save_pretrained(folder / HEALTHY)
        elif action == ALARM:
            watch.alarm_step = state.global_step
            kept = "none (no step before the window was kept)"
            if watch.healthy_step is not None:
                kept = f"{folder / PRE_COLLAPSE} (step {watch.healthy_step})"
            if main:
                shutil.rmtree(folder / PRE_COLLAPSE, ignore_errors=True)
                if (folder / HEALTHY).exists():
                    os.replace(folder / HEALTHY, folder / PRE_COLLAPSE)
                log.warning(watch.alarm_line(state.global_step, verdict, kept, self.stop_on_alarm))
            if self.stop_on_alarm:
                control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            shutil.rmtree(self.folder(args) / HEALTHY, ignore_errors=True)
        return control

    def state_dict(self) -> dict:
        return self.watch.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.watch.load_state_dict(state)
