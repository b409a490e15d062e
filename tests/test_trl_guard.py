"""covo's collapse guard inside TRL's GRPOTrainer: a huge learning rate collapses the tiny model,
the guard raises the alarm, keeps the weights from before the alarm's window and stops; its
writes come at most once per window and hold only the adapters under peft."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import grpo_config

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402  (installed with trl)
from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import TrainerCallback, TrainerControl, TrainerState  # noqa: E402

from covo.infra.errors import SettingError  # noqa: E402
from covo.integrations.trl import CollapseGuardCallback, CovoReward, grpo_trainer  # noqa: E402
from covo.models.loading import build_tiny  # noqa: E402

torch.set_num_threads(1)
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


def dataset() -> Dataset:
    sums = [(f"What is {a} + {b}?", str(a + b)) for a, b in [(12, 7), (3, 4), (25, 17), (8, 9)]]
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in sums]
    )


class Snapshots(TrainerCallback):
    """The policy's weights after every optimizer step, by step."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {
            name: value.detach().clone() for name, value in model.state_dict().items()
        }


def saturated(entry: dict, entropy_start: float | None) -> tuple[bool, list[str]]:
    """The default rules (conf/callbacks/default.yaml) recounted from one logged step: the
    step's saturation and the signals of the rules that held."""
    held = []
    if entry["collapse/top_answer_share"] >= 0.95:
        held.append("top_answer_share")
    if entropy_start is not None and entry["collapse/token_entropy"] <= 0.5 * entropy_start:
        held.append("token_entropy")
    if entry.get("collapse/kl", 0.0) >= 0.05:
        held.append("kl")
    return len([h for h in held if h != "kl"]) >= 2 or "kl" in held, held


def test_a_huge_learning_rate_raises_the_alarm_keeps_earlier_weights_and_stops(tmp_path, caplog):
    reward = CovoReward("self_certainty", ["callbacks.collapse_guard.stop_on_alarm=true"])
    loaded, snapshots = build_tiny(), Snapshots()
    loaded.model.save_pretrained(tmp_path / "tiny")  # TRL loads the KL's reference from it
    trainer = grpo_trainer(
        reward,
        model=str(tmp_path / "tiny"),
        processing_class=loaded.tokenizer,
        args=grpo_config(tmp_path / "run", learning_rate=0.1, beta=0.04, max_steps=30),
        train_dataset=dataset(),
        callbacks=[snapshots],
    )
    assert trainer.callback_handler.callbacks[0] is reward.guard  # before the reporters
    with caplog.at_level(logging.WARNING, logger="covo.integrations.trl.guard"):
        trainer.train()
    (line,) = [r.getMessage() for r in caplog.records if "collapse alarm" in r.getMessage()]
    alarm = int(re.search(r"collapse alarm at step (\d+):", line).group(1))
    # it stopped right after the alarm's step
    assert trainer.state.global_step == alarm < 30
    logged = [e for e in trainer.state.log_history if "collapse/alarm" in e]
    assert [e["step"] for e in logged] == list(range(1, alarm + 1))  # one a step
    assert [e["collapse/alarm"] for e in logged] == [0.0] * (alarm - 1) + [1.0]
    # the default rules recounted from the logged signals: the last 3 steps saturated, and
    # the line names each rule that held at the alarm's step
    start = sum(e["collapse/token_entropy"] for e in logged[:3]) / 3
    verdicts = [saturated(e, start if i >= 2 else None) for i, e in enumerate(logged)]
    assert all(s for s, _ in verdicts[-3:])
    # and the alarm came at the first window of 3 saturated steps, not later
    first = next(i for i in range(2, len(verdicts)) if all(s for s, _ in verdicts[i - 2 : i + 1]))
    assert alarm == logged[first]["step"]
    for signal in verdicts[-1][1]:
        assert signal in line
    # the weights kept are those after an earlier step, before the window, not the last ones
    kept = int(re.search(r"pre_collapse \(step (\d+)\)", line).group(1))
    assert kept <= alarm - 3 and not verdicts[kept - 1][0]
    saved = load_file(tmp_path / "run" / "pre_collapse" / "model.safetensors")
    assert saved
    for name, value in saved.items():
        assert torch.equal(value, snapshots.weights[kept][name]), name
    assert any(not torch.equal(v, snapshots.weights[alarm][k]) for k, v in saved.items())
    assert not (tmp_path / "run" / "last_healthy").exists()  # cleaned up at the end


def observe(guard, model, tmp_path, step: int, zero_var_frac: float) -> TrainerControl:
    state = TrainerState(global_step=step)
    logs = {"reward/mean": 0.5, "reward/zero_var_frac": zero_var_frac}
    control = guard.on_log(
        SimpleNamespace(output_dir=str(tmp_path)), state, TrainerControl(), logs=logs, model=model
    )
    assert logs["collapse/zero_var_frac"] == zero_var_frac  # its values join the log
    return control


def test_writes_once_per_window_hold_only_the_adapters_under_peft(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    model = build_tiny(lora=LORA).model
    guard = CollapseGuardCallback({"zero_var_frac": {"above": 0.5}}, min_rules=1, window_rollouts=2)
    writes, save = [], model.save_pretrained
    monkeypatch.setattr(
        model, "save_pretrained", lambda path, **kw: (writes.append(step), save(path, **kw))
    )
    for step in range(1, 8):
        with torch.no_grad():  # each step's adapters tell the steps apart
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(float(step))
        # saturated from step 4: the alarm at step 5 (steps 4 and 5 saturated)
        control = observe(guard, model, tmp_path, step, 1.0 if step >= 4 else 0.0)
        assert not control.should_training_stop  # stop_on_alarm is off
    # after steps 1 and 3 (a window apart), none after the alarm
    assert writes == [1, 3]
    folder = tmp_path / "pre_collapse"
    files = {p.name for p in folder.iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    adapters = load_file(folder / "adapter_model.safetensors")
    assert adapters and all("lora_" in name for name in adapters)  # no base weights
    assert all(torch.all(v == 3.0) for name, v in adapters.items() if "lora_B" in name)
    assert guard.watch.alarm_step == 5 and guard.watch.healthy_step == 3


def test_the_guard_is_bound_with_the_reward_or_left_out(tmp_path):
    loaded = build_tiny()
    kwargs = dict(model=loaded.model, processing_class=loaded.tokenizer, train_dataset=dataset())
    reward = CovoReward("majority")
    trainer = grpo_trainer(reward, args=grpo_config(tmp_path, max_steps=1), **kwargs)
    assert [c for c in trainer.callback_handler.callbacks if c is reward.guard] == [reward.guard]
    rules = reward.guard.watch.detector.rules
    assert {(r.signal, r.kind, r.value, r.alone) for r in rules} == {
        ("top_answer_share", "above", 0.95, False),
        ("token_entropy", "drop", 0.5, False),
        ("kl", "above", 0.05, True),
    }  # conf/callbacks/default.yaml's
    off = CovoReward("majority", ["callbacks.collapse_guard=null"])
    trainer = grpo_trainer(off, args=grpo_config(tmp_path, max_steps=1), **kwargs)
    assert off.guard is None
    assert not any(isinstance(c, CollapseGuardCallback) for c in trainer.callback_handler.callbacks)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "callbacks.collapse_guard.window_rollouts=0",
            r"^callbacks.collapse_guard.window_rollouts",
        ),
        (
            "callbacks.collapse_guard.stop_on_alarm=maybe",
            r"^callbacks.collapse_guard.stop_on_alarm=maybe",
        ),
        (
            "+callbacks.collapse_guard.rules.loss={above: 1}",
            r"^callbacks.collapse_guard.rules.loss: unknown",
        ),
        ("stats_token_budget=0", r"^stats_token_budget=0: expected an integer >= 1, or null"),
        ("stats_token_budgt=5", r"^Could not override 'stats_token_budgt'"),
    ],
)
def test_bad_settings_are_one_line_naming_the_key(override, message):
    with pytest.raises((ValueError, SettingError)) as err:
        CovoReward("covo", [override])
    assert re.match(message, str(err.value)) and "\n" not in str(err.value)


def zero_var_guard() -> CollapseGuardCallback:
    """A guard on `reward/zero_var_frac` above 0.5 alone, a window of 2, built as
    `CovoReward` builds it (from a `callbacks.collapse_guard` node)."""
    node = dict(stop_on_alarm=False, min_rules=1, window_rollouts=2, baseline_rollouts=1)
    node |= {"save_pre_collapse": True, "rules": {"zero_var_frac": {"above": 0.5}}}
    return CollapseGuardCallback.from_config(OmegaConf.create(node))


@pytest.mark.parametrize("restore", ["by_the_guard", "by_transformers"])
def test_a_resumed_run_goes_on_from_the_checkpoints_guard(restore, tmp_path):
    """Steps 1-3 unsaturated, 4 on saturated, window 2: one uninterrupted guard alarms at
    step 5 (steps 4 and 5), its weights kept after steps 1 and 3. Interrupted after step 4,
    the checkpoint's trainer state (JSON) brings back the baseline, window and kept step: the
    resumed guard alarms at step 5 too, not at 6, and names the weights of step 3."""
    model = build_tiny().model
    guard = zero_var_guard()
    for step in range(1, 5):
        observe(guard, model, tmp_path, step, 1.0 if step >= 4 else 0.0)
    assert guard.watch.alarm_step is None
    TrainerState(stateful_callbacks=[guard]).save_to_json(str(tmp_path / "trainer_state.json"))
    state = TrainerState.load_from_json(str(tmp_path / "trainer_state.json"))
    if restore == "by_the_guard":  # restore_callback_states_from_checkpoint off (the default)
        resumed = zero_var_guard()
        resumed.on_train_begin(None, state, TrainerControl())
    else:  # on: transformers rebuilds the callback from the stored args and attributes
        resumed = CollapseGuardCallback.from_state(
            state.stateful_callbacks["CollapseGuardCallback"]
        )
    observe(resumed, model, tmp_path, 5, 1.0)
    assert resumed.watch.alarm_step == 5 and resumed.watch.healthy_step == 3


def test_an_alarm_never_deletes_an_earlier_pre_collapse_folder(tmp_path, caplog):
    model = build_tiny().model
    earlier = tmp_path / "pre_collapse"
    earlier.mkdir()
    (earlier / "model.safetensors").write_text("an earlier alarm's weights")
    guard = zero_var_guard()
    with caplog.at_level(logging.WARNING, logger="covo.integrations.trl.guard"):
        for step in range(1, 6):
            observe(guard, model, tmp_path, step, 1.0 if step >= 4 else 0.0)
    assert (earlier / "model.safetensors").read_text() == "an earlier alarm's weights"
    kept = load_file(tmp_path / "pre_collapse-5" / "model.safetensors")
    weights = model.state_dict()
    assert kept and all(torch.equal(value, weights[name]) for name, value in kept.items())
    (line,) = [r.getMessage() for r in caplog.records if "collapse alarm" in r.getMessage()]
    assert f"{tmp_path / 'pre_collapse-5'} (step 3)" in line


def test_each_guard_reads_its_own_rewards_metrics(tmp_path):
    """Two covo rewards on one trainer log under their names; each guard reads its own."""
    guards = {"covo": zero_var_guard(), "majority": zero_var_guard()}
    for name, guard in guards.items():
        guard.prefix = f"{name}/"
    logs = {"covo/reward/mean": 0.5, "covo/reward/zero_var_frac": 1.0}
    logs |= {"majority/reward/mean": 0.4, "majority/reward/zero_var_frac": 0.25}
    args, model = SimpleNamespace(output_dir=str(tmp_path)), build_tiny().model
    for guard in guards.values():
        guard.on_log(args, TrainerState(global_step=1), TrainerControl(), logs=logs, model=model)
    assert logs["covo/collapse/zero_var_frac"] == 1.0
    assert logs["majority/collapse/zero_var_frac"] == 0.25
    assert "collapse/zero_var_frac" not in logs
    assert (tmp_path / "last_healthy-majority").is_dir()  # unsaturated: its weights kept
    assert not (tmp_path / "last_healthy-covo").exists()
