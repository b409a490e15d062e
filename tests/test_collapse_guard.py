"""The collapse guard: rules on synthetic signal streams, and tiny runs healthy and collapsing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import ConstantOnRollouts
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from covo.callbacks.collapse import CollapseDetector, slope
from covo.callbacks.collapse_guard import CollapseGuard
from covo.eval.harness import load_policy_checkpoint
from covo.launch.train import build
from covo.metrics.step import answer_metrics
from covo.models.loading import build_tiny
from covo.rewards.base import GroupReward

RULES = {"top_answer_share": {"above": 0.95}, "token_entropy": {"drop": 0.5}, "kl": {"above": 1.0}}


def stream(detector: CollapseDetector, **signals: list[float]):
    """Feed the per-step values; returns the verdict of every step."""
    steps = len(next(iter(signals.values())))
    return [detector.update({k: v[t] for k, v in signals.items()}) for t in range(steps)]


def test_a_healthy_stream_raises_no_alarm():
    verdicts = stream(
        CollapseDetector(RULES),
        top_answer_share=[0.25, 0.5, 0.75, 0.5, 1.0, 0.25, 0.5, 1.0, 0.75, 0.5, 0.25, 0.5],
        token_entropy=[5.9, 5.9, 5.8, 5.8, 5.7, 5.7, 5.6, 5.6, 5.5, 5.5, 5.5, 5.4],
        kl=[0.0, 0.001, 0.003, 0.005, 0.01, 0.02, 0.02, 0.03, 0.04, 0.05, 0.05, 0.06],
    )
    assert not any(v.alarm for v in verdicts)
    # a unanimous step alone (steps 4 and 7) meets one rule: not saturated
    assert [len(v.met) for v in verdicts] == [0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0]


def test_a_collapsing_stream_alarms_when_saturation_has_lasted_the_window():
    verdicts = stream(
        CollapseDetector(RULES),
        # start of token entropy: mean of the first 3 steps = 6.0; the rule holds at <= 3.0
        token_entropy=[6.2, 5.8, 6.0, 5.0, 4.0, 3.0, 2.9, 2.5, 2.0, 3.5, 2.0, 1.0, 0.5],
        top_answer_share=[0.3, 0.3, 0.4, 0.5, 0.6, 0.8, 0.96, 0.97, 0.99, 1.0, 1.0, 1.0, 1.0],
        kl=[0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.6, 0.7, 0.8],
    )
    saturated = [v.saturated for v in verdicts]
    # step 5: entropy 3.0 holds but the share 0.8 does not; steps 6-8 meet both rules;
    # step 9 (entropy 3.5) breaks the run, which starts again at step 10
    assert saturated == [False] * 6 + [True] * 3 + [False] + [True] * 3
    assert [t for t, v in enumerate(verdicts) if v.alarm] == [8, 12]
    # least-squares slope of the entropy over steps 5-7 (3.0, 2.9, 2.5): (-0.2 - 0.3) / 2
    assert verdicts[7].trends["token_entropy"] == pytest.approx(-0.25)
    assert verdicts[0].trends == {}  # one point has no slope


def test_absolute_rules_act_before_the_start_is_known_and_knobs_are_checked():
    detector = CollapseDetector(RULES, window_rollouts=2)
    verdicts = stream(detector, top_answer_share=[1.0, 1.0], kl=[2.0, 3.0], token_entropy=[1, 1])
    assert [v.alarm for v in verdicts] == [False, True]
    assert detector.start("token_entropy") is None  # 2 of the 3 baseline steps seen
    assert slope([1.0, 3.0, 2.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="rules.kl must be one of"):
        CollapseDetector({"kl": {"over": 1.0}})
    with pytest.raises(ValueError, match="min_rules must be in"):
        CollapseDetector(RULES, min_rules=4)
    with pytest.raises(ValueError, match="rules.loss: unknown signal"):
        CollapseGuard(rules={"loss": {"above": 1.0}})


def test_answer_metrics_measure_agreement_without_labels():
    def result(clusters, rewards):
        return GroupReward(rewards=rewards, answers=[], clusters=clusters, scores=[])

    metrics = answer_metrics(
        [result([0, 0, 1, -1], [1.0, 1.0, 0.0, 0.0]), result([-1, -1], [0, 0])]
    )
    # group 1: outcomes 2, 1 and the no-answer 1 of N = 4: -(0.5 ln 0.5 + 2 * 0.25 ln 0.25)
    # = 1.039721; group 2: two no-answers count as two outcomes: ln 2 = 0.693147
    assert metrics["rollout/answer_entropy"] == pytest.approx((1.039721 + 0.693147) / 2)
    assert metrics["rollout/top_answer_share"] == pytest.approx((0.5 + 0.0) / 2)
    assert metrics["rollout/distinct_answers"] == pytest.approx((2 + 0) / 2)
    assert metrics["reward/zero_var_frac"] == pytest.approx(0.5)


QUICK = [
    "reward=self_certainty",
    "rollout.max_new_tokens=12",
    "val_every_n_rollouts=100",
    "export_dir=null",
]


def scalars(tensorboard_dir: str) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(tensorboard_dir)
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def fit(cfg):
    module, datamodule, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    return trainer, scalars(trainer.logger.log_dir)


def test_a_tiny_run_at_the_default_learning_rate_raises_no_alarm(tiny_cfg):
    # self-certainty rewards every response differently: no group is filtered, one update a step
    cfg = tiny_cfg(*QUICK, "trainer.max_steps=6")  # baseline 3 + window 3
    trainer, values = fit(cfg)
    assert trainer.global_step == 6
    alarm = [value for _, value in values["collapse/alarm"]]
    assert alarm == [0.0] * 6
    for name in ("top_answer_share", "token_entropy", "kl", "answer_entropy", "len_mean"):
        assert len(values[f"collapse/{name}"]) == 6, name
    # the policy barely moved: far from every rule
    assert max(v for _, v in values["collapse/kl"]) < 0.01
    entropy = [v for _, v in values["collapse/token_entropy"]]
    assert min(entropy) > 0.9 * entropy[0]
    ckpts = Path(trainer.default_root_dir) / "checkpoints"
    assert not (ckpts / "pre_collapse.ckpt").exists()
    assert not (ckpts / "last_healthy.ckpt").exists()  # the guard cleans up after itself


def test_a_huge_learning_rate_collapses_the_tiny_model_and_the_guard_stops_it(tiny_cfg, caplog):
    cfg = tiny_cfg(
        *QUICK,
        "optimizer.lr=1e-1",
        "trainer.max_steps=60",
        "callbacks.collapse_guard.stop_on_alarm=true",
    )
    with caplog.at_level(logging.WARNING, logger="covo.callbacks.collapse_guard"):
        trainer, values = fit(cfg)
    alarm = values["collapse/alarm"]
    first = next(step for step, value in alarm if value == 1.0)
    # the run stopped right after the alarm's step
    assert alarm[-1] == (first, 1.0) and trainer.global_step == first + 1 < 60
    # recount the default rules from the logged signals: the first step ending 3 steps in a
    # row saturated, i.e. both of (share >= 0.95, entropy <= half its 3-step start) or
    # kl >= 0.05 (the drift rule, alone)
    share, kl = dict(values["collapse/top_answer_share"]), dict(values["collapse/kl"])
    entropy = dict(values["collapse/token_entropy"])
    start = sum(entropy[s] for s in range(3)) / 3
    saturated = {
        s: (share[s] >= 0.95) + (s >= 2 and entropy[s] <= 0.5 * start) == 2 or kl[s] >= 0.05
        for s in entropy
    }
    expected = next(
        s for s in sorted(saturated) if s >= 2 and all(saturated[s - k] for k in range(3))
    )
    assert first == expected
    # which rule fired (entropy halved with a unanimous answer, or the KL drift) and at which
    # step depend on the CPU's kernels (bf16 or fp32, BLAS): the guard's promise is the recount
    # above, on whatever trajectory this machine produced
    # the guard writes after an unsaturated rollout at least 3 rollouts after its last write;
    # the window's rollouts are saturated, so the weights kept precede the window
    written = None
    for s in range(first + 1):
        if not saturated[s] and (written is None or s - written >= 3):
            written = s
    assert written is not None and written + 1 <= first - 2
    ckpts = Path(trainer.default_root_dir) / "checkpoints"
    # ... the policy's weights after that rollout's step, which the evaluation harness loads
    model = build_tiny().model
    assert load_policy_checkpoint(model, ckpts / "pre_collapse.ckpt") == written + 1
    name = "model.layers.0.mlp.up_proj.weight"
    final = trainer.lightning_module.policy.state_dict()[name]
    assert not torch.equal(model.state_dict()[name], final)
    assert not (ckpts / "last_healthy.ckpt").exists()
    (line,) = [r.getMessage() for r in caplog.records if "collapse alarm" in r.getMessage()]
    assert f"collapse alarm at step {first}:" in line and "pre_collapse.ckpt" in line


def guarded_run(tiny_cfg, monkeypatch, rollouts, *overrides, saturated_from=None):
    """A run of `rollouts` rollouts (one optimizer step each); from rollout `saturated_from`
    on, every group's rewards are equal, so `reward/zero_var_frac` = 1 (0 before: self-certainty
    gives every response its own reward). Returns the trainer and the guard's writes (step,
    bytes)."""
    cfg = tiny_cfg(
        *QUICK,
        f"trainer.max_steps={rollouts}",
        "callbacks.model_checkpoint.every_n_steps=1",
        "~callbacks.collapse_guard.rules",
        "+callbacks.collapse_guard.rules={zero_var_frac: {above: 0.5}}",
        "callbacks.collapse_guard.min_rules=1",
        *overrides,
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(cfg.paths.output_dir) / f"run_{rollouts}")
    module, datamodule, trainer = build(cfg)
    if saturated_from is not None:
        module.reward = ConstantOnRollouts(module.reward, set(range(saturated_from, rollouts)), 1.0)
    writes, save = [], trainer.save_checkpoint

    def recording(path, weights_only=False, storage_options=None):
        save(path, weights_only, storage_options)
        if Path(path).name == "last_healthy.ckpt":
            writes.append((trainer.global_step, Path(path).stat().st_size))

    monkeypatch.setattr(trainer, "save_checkpoint", recording)
    trainer.fit(module, datamodule=datamodule)
    return trainer, writes


def test_the_guard_writes_once_per_window_and_keeps_weights_before_the_alarm(tiny_cfg, monkeypatch):
    # no alarm, window 3: writes after rollouts 0, 3, 6 (the weights of steps 1, 4, 7)
    trainer, writes = guarded_run(
        tiny_cfg, monkeypatch, 7, "callbacks.collapse_guard.window_rollouts=3"
    )
    assert [step for step, _ in writes] == [1, 4, 7]
    # window 2, saturated from rollout 3: writes after 0 and 2; the alarm at rollout 4 (3 and
    # 4 saturated) keeps rollout 2's weights (step 3), the last before the window
    trainer, writes = guarded_run(
        tiny_cfg, monkeypatch, 6, "callbacks.collapse_guard.window_rollouts=2", saturated_from=3
    )
    assert [step for step, _ in writes] == [1, 3]
    assert trainer.global_step == 6  # no stop_on_alarm: the run went on, writing nothing more
    ckpts = Path(trainer.default_root_dir) / "checkpoints"
    kept = torch.load(ckpts / "pre_collapse.ckpt", weights_only=False)
    step3 = torch.load(ckpts / "step_000003.ckpt", weights_only=False)
    step2 = torch.load(ckpts / "step_000002.ckpt", weights_only=False)
    assert kept["global_step"] == 3
    name = "policy.model.layers.0.mlp.up_proj.weight"
    assert torch.equal(kept["state_dict"][name], step3["state_dict"][name])
    assert not torch.equal(kept["state_dict"][name], step2["state_dict"][name])
    assert "optimizer_states" not in kept  # the weights only
