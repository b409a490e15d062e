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
observations; when the alarm first goes up that folder becomes `pre_collapse` (or, when a
`pre_collapse` folder exists already, `pre_collapse-<step>`: none is ever deleted), one
warning line names the rules that held, and with `stop_on_alarm` training stops after the step.

Its baseline, window, kept and alarm steps go into TRL's checkpoints (transformers'
`ExportableState`) and come back when training resumes from one. When two covo rewards share
a trainer each reward's metrics, and its guard's `collapse/...` values, carry the reward's
name (`prefix`). Under sharded parameters (FSDP2) every process gathers the full weights for
a keep (a collective: all processes take part in-line, the log being every process's), and
the main process writes them.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from covo.callbacks.collapse import ALARM, KEEP, CollapseWatch
from covo.callbacks.collapse_guard import SIGNALS as TRAINER_SIGNALS
from covo.infra.checks import BOOL, apply_rules

log = logging.getLogger(__name__)

# collapse/<name> <- the metric in TRL's log (the covo reward logs covo's names)
SIGNALS = {**TRAINER_SIGNALS, "len_mean": "completions/mean_length", "kl": "kl"}
ROLLOUT_METRIC = "reward/mean"  # a log holding it saw a covo reward's rollout
HEALTHY, PRE_COLLAPSE = "last_healthy", "pre_collapse"
KEYS = ("stop_on_alarm", "min_rules", "window_rollouts", "baseline_rollouts", "save_pre_collapse")


def full_weights(model) -> dict | None:
    """Under FSDP2 (DTensor parameters) the full state dict, gathered on every process (a
    collective); None for a model whose parameters are whole."""
    from torch.distributed.tensor import DTensor

    state = model.state_dict()
    if not any(isinstance(value, DTensor) for value in state.values()):
        return None
    return {
        name: value.full_tensor() if isinstance(value, DTensor) else value
        for name, value in state.items()
    }


def free_name(folder: Path, name: str, step: int) -> Path:
    """`folder / name`, or `name-<step>` when that exists (an earlier alarm's, kept)."""
    path = folder / name
    return folder / f"{name}-{step}" if path.exists() else path


class CollapseGuardCallback(TrainerCallback, ExportableState):
    """covo's collapse guard in a `transformers.Trainer`: `rules` and `watch`'s knobs
    (`min_rules`, `window_rollouts`, `baseline_rollouts`, `save_pre_collapse`) as in
    `covo.callbacks.collapse.CollapseWatch`; the weights are kept under `dirpath` (None: the
    trainer's `output_dir`); `prefix`: the covo metrics' prefix it reads (its reward's name
    and '/' when two covo rewards share the trainer)."""

    def __init__(
        self,
        rules: dict,
        stop_on_alarm: bool = False,
        dirpath: str | None = None,
        prefix: str = "",
        **watch,
    ):
        self.args = {"rules": dict(rules), "stop_on_alarm": stop_on_alarm, "dirpath": dirpath}
        self.args |= watch
        self.watch = CollapseWatch(rules, SIGNALS, **watch)
        self.stop_on_alarm = stop_on_alarm
        self.dirpath = dirpath
        self.prefix = prefix

    def state(self) -> dict:
        """transformers' `ExportableState`: what rebuilds this guard as it stands."""
        return {
            "args": {**self.args, "prefix": self.prefix},
            "attributes": {"watch_state": self.watch.state_dict()},
        }

    @property
    def watch_state(self) -> dict:
        return self.watch.state_dict()

    @watch_state.setter
    def watch_state(self, state: dict) -> None:
        self.watch.load_state_dict(state)

    def on_train_begin(self, args, state, control, **kwargs):
        """A resumed run's checkpoint holds this guard's state (whatever
        `restore_callback_states_from_checkpoint` says): it goes on from there."""
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        for entry in stored if isinstance(stored, list) else [stored]:
            if entry and entry.get("args", {}).get("prefix", "") == self.prefix:
                self.watch_state = entry["attributes"]["watch_state"]
                break
        return control

    @classmethod
    def from_config(cls, node: DictConfig) -> CollapseGuardCallback:
        """From a `callbacks.collapse_guard` node; its checkpoint keys (`dirpath`,
        `save_weights_only`, `_target_`) are covo's trainer's: TRL's `output_dir` is used."""
        prefix = "callbacks.collapse_guard."
        apply_rules(node, [("stop_on_alarm", *BOOL), ("save_pre_collapse", *BOOL)], prefix)
        rules = OmegaConf.to_container(node.rules)
        return cls(rules, **{key: node[key] for key in KEYS})

    def folder(self, args) -> Path:
        return Path(self.dirpath or args.output_dir)

    def named(self, base: str) -> str:
        """A folder's name: `base`, with its reward's name when two covo rewards share the
        trainer (`last_healthy-covo`)."""
        return f"{base}-{self.prefix.rstrip('/')}" if self.prefix else base

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        prefix = self.prefix
        if not logs or prefix + ROLLOUT_METRIC not in logs:
            return control
        watch = self.watch
        seen = {
            **logs,
            **{k.removeprefix(prefix): v for k, v in logs.items() if k.startswith(prefix)},
        }
        logged, verdict, action = watch.observe(seen)
        logged = {prefix + name: value for name, value in logged.items()}
        logs.update(logged)  # the callbacks after this one report it
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(logged)
        folder, main = self.folder(args), state.is_world_process_zero
        healthy = folder / self.named(HEALTHY)
        if action == KEEP:
            watch.healthy_step = state.global_step
            weights = full_weights(model)
            if main:
                model.save_pretrained(healthy, state_dict=weights)
        elif action == ALARM:
            watch.alarm_step = state.global_step
            target = free_name(folder, self.named(PRE_COLLAPSE), state.global_step)
            kept = "none (no step before the window was kept)"
            if watch.healthy_step is not None:
                kept = f"{target} (step {watch.healthy_step})"
            if main:
                if healthy.exists():
                    os.replace(healthy, target)
                log.warning(watch.alarm_line(state.global_step, verdict, kept, self.stop_on_alarm))
            if self.stop_on_alarm:
                control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            shutil.rmtree(self.folder(args) / self.named(HEALTHY), ignore_errors=True)
        return control

    def state_dict(self) -> dict:
        return self.watch.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.watch.load_state_dict(state)
