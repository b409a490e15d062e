"""End-to-end runs of `train(cfg)` on the tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import PeekingMajority
from omegaconf import OmegaConf, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from covo.launch.train import build, train, write_config
from covo.rewards.base import LabelWithheldError

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
    "diag/num_answers",
]
VAL_TAGS = ["val/accuracy", "val/len_mean"]


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


def test_train_logs_checkpoints_and_exports(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "reward=self_certainty",
        "callbacks.model_checkpoint.every_n_steps=1",
        "val_every_n_rollouts=1",
    )
    out = train(cfg)
    values = scalars(out["tensorboard_dir"])
    for tag in STEP_TAGS + VAL_TAGS:
        assert tag in values, tag
        assert len(values[tag]) == 2, tag
        assert all(torch.isfinite(torch.tensor(values[tag]))), tag
    # a warm-up of ceil(2 * 0.03) = 1 step: half of 2e-6, then the peak (no room to decay)
    assert values["train/lr"] == pytest.approx([1e-6, 2e-6], abs=1e-12)

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
    config = (Path(out["output_dir"]) / "config.yaml").read_text()
    assert "${" not in config and "max_steps: 2" in config  # resolved, as the run used it


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_group_estimators_get_their_advantages_from_the_rewards(tiny_cfg, algorithm, monkeypatch):
    import covo.module

    seen = []
    advantages = covo.module.SelfRewardRL.advantages

    def recording(self, rollout, rewards, plan):
        out = advantages(self, rollout, rewards, plan)
        seen.append((rewards.clone(), plan.keep.clone(), out, rollout.response_mask))
        return out

    monkeypatch.setattr(covo.module.SelfRewardRL, "advantages", recording)
    cfg = tiny_cfg(
        f"algorithm={algorithm}",
        "algorithm.kl_coef=0",
        "reward=entropy",
        "trainer.max_steps=1",
        "callbacks=none",
        "logger=none",
        "export_dir=null",
    )
    train(cfg)
    ((rewards, keep, adv, mask),) = seen
    assert keep.all()  # entropy rewards differ within every group
    for g in range(len(rewards) // 3):
        r = rewards[3 * g : 3 * g + 3].tolist()
        mean = sum(r) / 3
        # float32 rewards of a near-uniform model differ by ~1e-3 of their size: rounding at
        # that size, divided by the group's std, bounds how closely float32 can match
        rounding = 4 * torch.finfo(torch.float32).eps * max(abs(x) for x in r)
        if algorithm == "grpo":
            std = math.sqrt(sum((x - mean) ** 2 for x in r) / 2)
            want = [(x - mean) / (std + 1e-6) for x in r]
            atol = 1e-5 + rounding / std * max(1.0, max(abs(w) for w in want))
        else:
            want = [x - (sum(r) - x) / 2 for x in r]
            atol = 1e-5 + rounding
        for i in range(3):
            row = 3 * g + i
            got = adv[row][mask[row].bool()]
            torch.testing.assert_close(got, torch.full_like(got, want[i]), atol=atol, rtol=0)


COVO_TAGS = [
    "reward/consistency",
    "reward/volatility",
    "reward/intrinsic",
    "reward/num_states",
    "reward/pass_frac",
    "reward/num_answers",
    "diag/reward_accuracy",
    "diag/majority_reward_accuracy",
    "diag/label_accuracy",
    "diag/majority_label_accuracy",
    "diag/answer_entropy",
    "time/scoring_s",
    "perf/scoring_tokens",
    "perf/scoring_floor_tokens",
    "perf/scoring_reused_tokens",
]


def covo_scalars(tiny_cfg, output_dir: Path, *overrides: str) -> dict[str, list[float]]:
    """TensorBoard scalars of a tiny CoVo run (4 samples, no validation) into `output_dir`; the
    random tiny model writes digits, seldom a box: its answers are the last numbers."""
    cfg = tiny_cfg(
        "reward=covo_last_number",
        "rollout.num_samples=4",
        "rollout.max_new_tokens=32",
        "callbacks=none",
        "export_dir=null",
        "val_every_n_rollouts=100",
        *overrides,
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return scalars(train(cfg)["tensorboard_dir"])


def test_reusing_rollout_caches_changes_no_reward(tiny_cfg, tmp_path):
    runs = {
        reuse: covo_scalars(
            tiny_cfg, tmp_path / f"reuse_{reuse}", f"module.reuse_rollout_cache={reuse}"
        )
        for reuse in (True, False)
    }
    reused, fed = runs[True], runs[False]
    assert reused["reward/num_answers"][0] >= 2
    for tag in ("reward/mean", "reward/consistency", "reward/volatility", "train/loss"):
        assert reused[tag] == pytest.approx(fed[tag], abs=1e-5), tag
    # without the cache every trajectory is fed again: exactly the floor
    assert fed["perf/scoring_tokens"] == fed["perf/scoring_floor_tokens"]
    assert fed["perf/scoring_reused_tokens"] == [0.0, 0.0]
    assert reused["perf/scoring_floor_tokens"] == fed["perf/scoring_floor_tokens"]
    assert all(r > 0 for r in reused["perf/scoring_reused_tokens"])


@pytest.mark.parametrize(
    "overrides, keeps",
    [
        ([], True),
        (["module.reuse_rollout_cache=false"], False),
        (["reward=majority"], False),
        # scoring on another replica than the rollout's: its keys and values would not match
        (["rollout.dtype=null", "module.scoring_dtype=bfloat16"], False),
    ],
)
def test_rollout_keeps_caches_only_for_a_scorer_on_the_same_weights(tiny_cfg, overrides, keeps):
    cfg = tiny_cfg("reward=covo", *overrides, "callbacks=none", "logger=none")
    module, _, _ = build(cfg)
    assert module.sampler.keep_cache is keeps


def test_covo_run_logs_reward_components_and_diagnostics(tiny_cfg):
    # the random tiny model writes digits, so groups have several answers (K >= 2)
    cfg = tiny_cfg(
        "reward=covo_last_number",
        "rollout.num_samples=4",
        "rollout.max_new_tokens=32",
        "module.plots_every_n_steps=1",
        "callbacks=none",
        "export_dir=null",
    )
    out = train(cfg)
    values = scalars(out["tensorboard_dir"])
    for tag in COVO_TAGS:
        assert tag in values, tag
        assert all(torch.isfinite(torch.tensor(values[tag]))), tag
    assert values["reward/num_answers"][0] >= 2
    assert 0.0 <= min(values["reward/consistency"]) <= max(values["reward/consistency"]) <= 1.0
    # the trajectories come from the rollout's cache: the scorer feeds the tries plus one
    # re-fed token per state (its last context token), i.e. the floor less the reused context
    # plus at most one token per state
    fed, floor = values["perf/scoring_tokens"], values["perf/scoring_floor_tokens"]
    reused = values["perf/scoring_reused_tokens"]
    for step, states in enumerate(values["reward/num_states"]):
        assert 0 < fed[step] < floor[step] - reused[step] / 2
        assert floor[step] <= fed[step] + reused[step] <= floor[step] + states * 8
    events = EventAccumulator(out["tensorboard_dir"])
    events.Reload()
    assert "diag/distance_curves" in events.Tags()["images"]
    assert any(tag.startswith("diag/consistency/") for tag in events.Tags()["histograms"])
    assert "samples/text_summary" in events.Tags()["tensors"]


def test_curiosity_is_logged_only_when_on(tiny_cfg, tmp_path):
    logged = {
        weight: covo_scalars(
            tiny_cfg,
            tmp_path / f"curiosity_{weight}",
            f"reward.curiosity.weight={weight}",
            "trainer.max_steps=1",
        )
        for weight in (0.0, 0.1)
    }
    assert "reward/curiosity" not in logged[0.0]
    (curiosity,) = logged[0.1]["reward/curiosity"]
    assert math.isfinite(curiosity) and curiosity != 0.0
    # the same rollout (same seed, same weights): the bonus moves the mean reward
    assert logged[0.1]["reward/consistency"] == logged[0.0]["reward/consistency"]
    assert logged[0.1]["reward/mean"] != logged[0.0]["reward/mean"]


def test_validation_accuracy_is_pooled_over_batches_and_its_best_kept(tiny_cfg, monkeypatch):
    # 3 validation prompts in batches of 2 and 1, checked after each of the 2 steps
    cfg = tiny_cfg(
        "reward=self_certainty",
        "val_every_n_rollouts=1",
        "data.val.num_problems=3",
        "data.val_batch_size=2",
        "callbacks=none",
        "logger=none",
        "export_dir=null",
    )
    module, datamodule, trainer = build(cfg)
    for item in datamodule.val_items:
        item["answer"] = "1"
    answers = iter(["1", "0", "1", "0", "0", "0"])
    monkeypatch.setattr(module, "val_extract", lambda text: next(answers))
    logged = []
    monkeypatch.setattr(
        module,
        "on_validation_end",
        lambda: logged.append({k: float(v) for k, v in trainer.callback_metrics.items()}),
    )
    trainer.fit(module, datamodule=datamodule)
    # first check: 2 of 3 right (the mean of the batch means would be 0.75); second: none
    assert [m["val/accuracy"] for m in logged] == pytest.approx([2 / 3, 0.0])
    assert [m["val/accuracy_best"] for m in logged] == pytest.approx([2 / 3, 2 / 3])


def test_fp16_clips_and_logs_the_unscaled_gradient_norm(tiny_cfg, tmp_path):
    # a norm read before the GradScaler unscales would be ~65,536 (its first scale, 2**16) times
    # the fp32 one; fp16 kernels may sample other tokens than fp32 on another CPU, so the two
    # runs' norms are compared within a factor 8, not to the token
    norms = {}
    for precision in ("32-true", "16-mixed"):
        cfg = tiny_cfg(
            "reward=self_certainty",
            "callbacks=none",
            "export_dir=null",
            f"trainer.precision={precision}",
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / precision)
        out = train(cfg)
        norms[precision] = scalars(out["tensorboard_dir"])["train/grad_norm"]
    assert norms["32-true"][0] > 0.5
    assert len(norms["16-mixed"]) == len(norms["32-true"]) == 2
    for fp16, fp32 in zip(norms["16-mixed"], norms["32-true"]):
        assert fp32 / 8 < fp16 < fp32 * 8, (fp16, fp32)


VAL_RESPONSES = [
    ("3 + 4 = 7, so the answer is 7.", "7"),  # no box: only a last-number reader finds 7
    (r"First \boxed{5}, or rather 6", "5"),  # the box says 5, the last number 6
    (r"\boxed{} it is 9", "9"),  # an empty box: the released reader's answer is ""
]


@pytest.mark.parametrize(
    "overrides, extractor, correct",
    [
        (["reward=covo"], "released_boxed", [0.0, 1.0, 0.0]),
        (["reward=covo_last_number"], "boxed_or_last_number", [1.0, 1.0, 1.0]),
        (["reward=covo", "module.val_extractor=last_number"], "last_number", [1.0, 0.0, 1.0]),
    ],
)
def test_validation_reads_answers_with_the_configured_extractor(
    tiny_cfg, overrides, extractor, correct, caplog
):
    cfg = tiny_cfg(*overrides, "callbacks=none", "logger=none")
    module, _, _ = build(cfg)
    texts, labels = zip(*VAL_RESPONSES)
    assert module.grade(list(texts), list(labels)) == correct
    with caplog.at_level("INFO", logger="covo.module"):
        module.on_fit_start()
    assert f"module.val_extractor={extractor}" in caplog.text
    assert OmegaConf.load(write_config(cfg)).module.val_extractor == extractor


def test_training_withholds_labels_from_a_label_free_reward(tiny_cfg):
    """The module gives a label-free reward no label (reading it raises), while ground truth
    gets it; the diagnostics keep theirs (`diag/accuracy` is logged by the other runs here)."""
    cfg = tiny_cfg("reward=majority", "trainer.max_steps=1", "callbacks=none", "logger=none")
    module, datamodule, trainer = build(cfg)
    module.reward = PeekingMajority()
    with pytest.raises(LabelWithheldError, match="PeekingMajority read Group.label"):
        trainer.fit(module, datamodule=datamodule)
    cfg = tiny_cfg("reward=ground_truth", "trainer.max_steps=1", "callbacks=none", "logger=none")
    module, datamodule, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1
