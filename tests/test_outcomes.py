"""The outcome study: numbers from fixed curves by hand, resume, bad input, and one real tiny
study end to end (the held-out evaluation callback: tests/test_heldout_eval.py)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import CONF_DIR, ROOT, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from scipy import stats
from torch.utils.tensorboard import SummaryWriter

import covo.analysis.outcomes as outcomes_module
from covo.analysis.outcome_metrics import (
    aggregate,
    fall_step,
    markdown,
    replay_alarm,
    replayed_guards,
    run_numbers,
)
from covo.analysis.outcomes import first_alarm, outcomes, policy_steps
from covo.infra.errors import exit_on_user_error


def curve(*points: tuple[int, float, float, float]) -> list[dict]:
    return [
        {"step": s, "sampled_accuracy": a, "greedy_accuracy": g, "maj_accuracy": m}
        for s, a, g, m in points
    ]


def run(reward, seed, alarm, sampled, greedy, maj, steps=(0, 5, 10, 15)) -> dict:
    return {"reward": reward, "seed": seed, "alarm_step": alarm,
            "curve": curve(*zip(steps, sampled, greedy, maj))}  # fmt: skip


# seeds 0-2 of two rewards: sampled, greedy and maj@N accuracy at steps 0, 5, 10, 15
GT = "ground_truth"
RUNS = [
    run(GT, 0, None, [0.30, 0.40, 0.50, 0.55], [0.25, 0.5, 0.5, 0.75], [0.5, 0.5, 0.75, 0.75]),
    run(GT, 1, None, [0.20, 0.35, 0.45, 0.40], [0.25, 0.25, 0.5, 0.5], [0.25, 0.5, 0.5, 0.5]),
    run(GT, 2, None, [0.25, 0.30, 0.40, 0.50], [0.0, 0.25, 0.25, 0.5], [0.25, 0.25, 0.5, 0.75]),
    # rises to 0.45 at step 5, falls to 0.35 at step 10 (0.10 below the peak): alarm at 5
    run("majority", 0, 5, [0.30, 0.45, 0.35, 0.20], [0.25, 0.5, 0.25, 0.25], [0.5, 0.5, 0.5, 0.25]),
    # falls at step 15 (0.40 -> 0.30 from a 0.40 peak), no alarm: missed
    run("majority", 1, None, [0.20, 0.40, 0.38, 0.30], [0.25] * 4, [0.25, 0.5, 0.5, 0.25]),
    # never falls 0.05 below its peak, alarm at 10: a false alarm
    run("majority", 2, 10, [0.25, 0.30, 0.30, 0.27], [0.0, 0.25, 0.25, 0.25], [0.25] * 4),
]  # fmt: skip


def t_interval(values):
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def close(cell: dict, expected: tuple[float, float, float]):
    assert (cell["value"], cell["low"], cell["high"]) == pytest.approx(expected, abs=1e-6)


def test_gains_peaks_intervals_and_paired_differences_by_hand():
    results = aggregate(
        RUNS, ["ground_truth", "majority"], ["majority", "ground_truth"], 0.05, 0.95
    )
    gt, maj = results["rewards"]["ground_truth"], results["rewards"]["majority"]
    # ground truth: end gains 0.25, 0.20, 0.25; peak gains 0.25, 0.25, 0.25 at 15, 10, 15
    close(gt["gain_end"], t_interval([0.25, 0.20, 0.25]))
    assert gt["gain_peak"]["value"] == pytest.approx(0.25) and gt["gain_peak"][
        "low"
    ] == pytest.approx(0.25)
    close(gt["peak_step"], t_interval([15, 10, 15]))
    close(gt["greedy_gain_end"], t_interval([0.50, 0.25, 0.50]))
    close(gt["maj_gain_end"], t_interval([0.25, 0.25, 0.50]))
    # majority: end gains -0.10, 0.10, 0.02; peaks 0.15 (step 5), 0.20 (5), 0.05 (5)
    close(maj["gain_end"], t_interval([-0.10, 0.10, 0.02]))
    close(maj["gain_peak"], t_interval([0.15, 0.20, 0.05]))
    assert maj["peak_step"]["value"] == 5 and maj["peak_step"]["n"] == 3
    assert maj["alarm_step"]["value"] == pytest.approx(7.5) and maj["alarm_step"]["n"] == 2
    close(maj["alarm_step"], t_interval([5, 10]))
    # paired per seed: majority - ground truth = -0.35, -0.10, -0.23 (end), -0.10, -0.05, -0.20
    vs_gt = results["paired"]["ground_truth"]["majority"]
    assert vs_gt["seeds"] == [0, 1, 2]
    assert vs_gt["gain_end"]["per_seed"] == pytest.approx([-0.35, -0.10, -0.23])
    close(vs_gt["gain_end"], t_interval([-0.35, -0.10, -0.23]))
    close(vs_gt["gain_peak"], t_interval([-0.10, -0.05, -0.20]))
    assert results["paired"]["majority"]["ground_truth"]["gain_end"]["per_seed"] == pytest.approx(
        [0.35, 0.10, 0.23]
    )
    # the learning-curve band at step 5: ground truth 0.40, 0.35, 0.30
    band = gt["curve"]
    assert band["steps"] == [0, 5, 10, 15]
    assert (band["value"][1], band["low"][1], band["high"][1]) == pytest.approx(
        t_interval([0.40, 0.35, 0.30])
    )


def test_the_guard_against_the_first_fall():
    numbers = {
        (n["reward"], n["seed"]): n
        for n in aggregate(RUNS, ["ground_truth", "majority"], [], 0.05, 0.95)["per_run"]
    }
    assert [numbers["majority", s]["fall_step"] for s in range(3)] == [10, 15, None]
    assert [numbers["majority", s]["guard"] for s in range(3)] == [
        "caught",
        "missed",
        "false_alarm",
    ]
    assert numbers["majority", 0]["lead"] == 5  # alarm at 5, fall at 10
    assert [numbers["ground_truth", s]["guard"] for s in range(3)] == ["quiet", "missed", "quiet"]
    # ground truth seed 1: 0.45 -> 0.40 at step 15, exactly 0.05 below its peak: a fall
    assert numbers["ground_truth", 1]["fall_step"] == 15
    results = aggregate(RUNS, ["majority"], [], 0.05, 0.95)
    summary = results["rewards"]["majority"]
    assert summary["guard"] == {"caught": 1, "late": 0, "missed": 1, "false_alarm": 1, "quiet": 0}
    # the table's fall step: mean of 10 and 15 over the 2 of 3 runs that fell, t(0.975, 1)
    # 12.706 x standard error 2.5 either side
    row = next(line for line in markdown(results, []).splitlines() if line.startswith("| majority"))
    assert row.split(" | ")[6] == "12.5 [-19.3, 44.3] (n=2)"
    # an alarm after the fall is late; a 0.1 threshold sees no fall in seed 1
    assert run_numbers({**RUNS[3], "alarm_step": 15}, 0.05)["guard"] == "late"
    assert fall_step(RUNS[4]["curve"], 0.1) == 15 and fall_step(RUNS[4]["curve"], 0.11) is None


def fake_run(directory: Path, alarm_at: int | None, steps: int = 2) -> None:
    """What a finished training run leaves: heldout.jsonl and the guard's alarm events."""
    points = curve(*((s, 0.1 * s, 0.0, 0.0) for s in range(steps + 1)))
    (directory / "heldout.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    writer = SummaryWriter(str(directory / "tensorboard"))
    for step in range(steps):
        writer.add_scalar("collapse/alarm", float(alarm_at is not None and step >= alarm_at), step)
        writer.add_scalar("collapse/kl", 0.1 * step, step)
        writer.add_scalar("train/optimizer_steps", 1.0, step)
    writer.close()


@pytest.fixture
def stub_training(monkeypatch):
    """Replaces the training process: records each command, fakes its outputs; runs named in
    `fail` exit 1 (after leaving a checkpoint, as an interrupted run does)."""
    launched, fail = [], set()

    def launch(command, log_path):
        directory = Path(next(a for a in command if a.startswith("hydra.run.dir="))[14:])
        reward = next(a for a in command if a.startswith("reward="))[7:]
        seed = int(next(a for a in command if a.startswith("seed="))[5:])
        launched.append((reward, seed, command))
        if (reward, seed) in fail:
            (directory / "checkpoints").mkdir(parents=True, exist_ok=True)
            (directory / "checkpoints" / "last.ckpt").write_bytes(b"")
            return 1
        fake_run(directory, alarm_at=1 if reward == "majority" else None)
        return 0

    monkeypatch.setattr(outcomes_module, "launch", launch)
    return launched, fail


def study_cfg(tmp_path, *overrides):
    return compose_config(
        "outcomes",
        ["train.model=tiny", "rewards=[ground_truth,majority]", "seeds=2", *overrides],
        tmp_path,
    )


def test_a_resumed_study_trains_only_unfinished_runs(tmp_path, stub_training, capsys):
    launched, fail = stub_training
    fail.add(("majority", 1))
    first = outcomes(study_cfg(tmp_path, "jobs=2", "cores=[0]"))
    assert sorted((r, s) for r, s, _ in launched) == [
        ("ground_truth", 0), ("ground_truth", 1), ("majority", 0), ("majority", 1)
    ]  # fmt: skip
    assert len(first["per_run"]) == 3 and len(first["failed"]) == 1
    command = next(c for r, s, c in launched if (r, s) == ("majority", 0))
    assert command[:3] == ["taskset", "-c", "0"] and "threads=1" in command
    assert "model=tiny" in command and "callbacks=heldout_eval" in command
    assert not any(a.startswith("ckpt_path=") for a in command)
    # the rerun: the three finished runs are not launched; the failed one resumes
    launched.clear()
    fail.clear()
    second = outcomes(study_cfg(tmp_path, "jobs=2", "cores=[0]"))
    assert [(r, s) for r, s, _ in launched] == [("majority", 1)]
    last = tmp_path / "runs" / "majority" / "seed_1" / "checkpoints" / "last.ckpt"
    assert f"ckpt_path={last}" in launched[0][2]
    assert len(second["per_run"]) == 4 and second["failed"] == []
    runs = {(r["reward"], r["seed"]): r for r in second["runs"]}
    assert runs["majority", 0]["alarm_step"] == 1 and runs["ground_truth", 0]["alarm_step"] is None
    assert [step for step, _ in runs["majority", 0]["signals"]["kl"]] == [0, 1]
    assert [v for _, v in runs["majority", 0]["signals"]["kl"]] == pytest.approx([0.0, 0.1])
    # every point gains 0.1 per step: end gain 0.2 in every run, differences 0
    assert second["rewards"]["majority"]["gain_end"]["value"] == pytest.approx(0.2)
    assert second["paired"]["ground_truth"]["majority"]["gain_end"]["value"] == pytest.approx(0)
    assert json.loads((tmp_path / "outcomes.json").read_text())["rewards"]["majority"]["runs"] == 2
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
    # a third call trains nothing; launch=false only aggregates, even with runs unfinished
    launched.clear()
    outcomes(study_cfg(tmp_path))
    assert launched == []
    partial = outcomes(study_cfg(tmp_path, "seeds=3", "launch=false"))
    assert launched == [] and len(partial["per_run"]) == 4


def test_the_alarm_step_counts_optimizer_steps_not_rollouts():
    # rollouts 0-4; rollout 1 took no step (every group filtered), rollout 3 took two
    stepped = [(0, 1.0), (2, 1.0), (3, 2.0), (4, 1.0)]
    assert policy_steps(stepped, [0, 1, 2, 3, 4]) == [0, 1, 1, 2, 4]
    alarm = [(0, 0.0), (1, 0.0), (2, 0.0), (3, 1.0), (4, 1.0)]
    assert first_alarm(alarm, stepped) == 2  # raised by the rollout of the policy after 2 steps
    assert first_alarm([(b, 0.0) for b in range(5)], stepped) is None


def test_a_guard_replayed_on_logged_signals():
    # rollouts 0-5, rollout 2 took no step; KL per rollout; entropy from 6.0
    signals = {
        "step": [[0, 0], [1, 1], [2, 2], [3, 2], [4, 3], [5, 4]],
        "kl": [[0, 0.0], [1, 0.5], [2, 1.2], [3, 0.9], [4, 1.5], [5, 2.0]],
        "token_entropy": [[b, 6.0] for b in range(6)],
        "alarm": [[b, 0.0] for b in range(6)],
    }
    drift = {
        "rules": {"kl": {"above": 1.0}},
        "min_rules": 1,
        "window_rollouts": 2,
        "baseline_rollouts": 3,
    }
    # KL >= 1 at rollouts 2, 4, 5: two in a row first at rollout 5, the policy after 4 steps
    assert replay_alarm(signals, drift) == 4
    assert replay_alarm(signals, {**drift, "window_rollouts": 1}) == 2
    both = {
        **drift,
        "rules": {"kl": {"above": 1.0}, "token_entropy": {"drop": 0.5}},
        "min_rules": 2,
    }
    assert replay_alarm(signals, both) is None
    runs = [{**RUNS[3], "signals": signals}, {**RUNS[0], "signals": signals}]
    replay = replayed_guards(runs, {"drift": drift}, ["majority", GT], 0.05, 0.95)["drift"]
    # majority seed 0 falls at step 10: an alarm at 4 leads by 6; ground truth never falls
    assert replay["rewards"]["majority"]["guard"]["caught"] == 1
    assert replay["rewards"]["majority"]["lead"]["value"] == 6
    assert replay["rewards"][GT]["guard"]["false_alarm"] == 1


@pytest.mark.parametrize(
    "override,key",
    [
        ("rewards=[ground_truth,no_such_reward]", "rewards"),
        ("seeds=0", "seeds"),
        ("seeds=[]", "seeds"),
        ("train.model=???", "train.model"),
        ("train.model=no_such_model", "model/no_such_model"),
        ("eval_every=-1", "eval_every"),
    ],
)
def test_bad_input_is_one_line_naming_the_key_before_any_run(
    override, key, tmp_path, stub_training, capsys
):
    launched, _ = stub_training
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(outcomes)(study_cfg(tmp_path, override))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err, err
    assert launched == [] and not (tmp_path / "runs").exists()


def test_the_command_line_rejects_an_unknown_reward_with_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "covo.analysis.outcomes", "train.model=tiny", "rewards=[nope]",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: rewards: unknown reward 'nope' (no reward/nope.yaml in covo's conf/ or the run's "
        "hydra.searchpath)"
    )


USER_REWARD = """
from covo.rewards.majority import MajorityReward


class ScaledMajority(MajorityReward):
    def __init__(self, scale: float = 1.0, **answers):
        super().__init__(**answers)
        self.scale = scale
"""


@contextmanager
def inside_run(overrides: list[str], output_dir: Path):
    """The outcomes config as `covo outcomes ...` runs it: its Hydra settings (searchpath)
    those of the run in progress."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("outcomes", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(output_dir)
    try:
        yield cfg
    finally:
        HydraConfig.instance().cfg = None


def test_a_reward_of_your_own_folder_is_found_through_hydra_searchpath(
    tmp_path, stub_training, monkeypatch
):
    """Each run's config is composed, checked and launched with the study's `hydra.searchpath`:
    the user's YAML (its class on the user's path) becomes the run's reward."""
    mine = tmp_path / "mine"
    (mine / "conf" / "reward").mkdir(parents=True)
    (mine / "outcomes_user_rewards.py").write_text(USER_REWARD)
    (mine / "conf" / "reward" / "scaled_majority.yaml").write_text(
        "_target_: outcomes_user_rewards.ScaledMajority\nscale: 0.25\n"
    )
    monkeypatch.syspath_prepend(str(mine))
    composed = {}

    def check_train(cfg):
        reward = real_check_train(cfg)
        composed[cfg.seed, type(reward).__name__] = (cfg.reward, reward)
        return reward

    real_check_train = outcomes_module.check_train
    monkeypatch.setattr(outcomes_module, "check_train", check_train)
    launched, _ = stub_training
    searchpath = f"hydra.searchpath=[file://{mine / 'conf'}]"
    overrides = ["train.model=tiny", "rewards=[majority,scaled_majority]", "seeds=[3]", searchpath]
    with inside_run(overrides, tmp_path / "study") as cfg:
        results = outcomes(cfg)
    node, reward = composed[3, "ScaledMajority"]
    assert node._target_ == "outcomes_user_rewards.ScaledMajority" and node.scale == 0.25
    assert reward.scale == 0.25
    assert composed[3, "MajorityReward"][0]._target_ == "covo.rewards.majority.MajorityReward"
    assert results["rewards"]["scaled_majority"]["runs"] == 1
    # the training process gets the searchpath: its command composes the user's reward
    command = next(c for r, _, c in launched if r == "scaled_majority")
    train_args = command[command.index("train") + 1 :]
    assert f"hydra.searchpath=['file://{mine / 'conf'}']" in train_args
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        run = compose("train", [a for a in train_args if not a.startswith("hydra.run.")])
    assert run.reward._target_ == "outcomes_user_rewards.ScaledMajority" and run.seed == 3


def test_a_reward_in_no_folder_of_the_searchpath_is_one_line_naming_rewards(
    tmp_path, stub_training, capsys
):
    (tmp_path / "conf" / "reward").mkdir(parents=True)
    overrides = [
        "train.model=tiny",
        "rewards=[majority,not_there]",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
    ]
    with inside_run(overrides, tmp_path / "study") as cfg, pytest.raises(SystemExit):
        exit_on_user_error(outcomes)(cfg)
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: rewards: unknown reward 'not_there' (no reward/not_there.yaml in covo's conf/ "
        "or the run's hydra.searchpath)"
    )
    assert stub_training[0] == []


@pytest.mark.slow
def test_a_tiny_study_end_to_end(tmp_path):
    proc = subprocess.run(
        [
            sys.executable, "-m", "covo.analysis.outcomes", "train.model=tiny",
            "rewards=[ground_truth,majority]", "seeds=2", "train.steps=2", "eval_every=1",
            'train.extra=["data.val.num_problems=4","rollout.max_new_tokens=16",'
            '"callbacks.heldout_eval.num_samples=4","rollout.num_samples=3",'
            '"algorithm.filter.drop_all_zero=false"]',
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "outcomes.json").read_text())
    assert len(results["per_run"]) == 4
    for run in results["runs"]:
        assert [p["step"] for p in run["curve"]] == [0, 1, 2]
        assert all(0 <= p["sampled_accuracy"] <= 1 for p in run["curve"])
    assert (tmp_path / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert re.search(r"\| majority \| 2 \|", proc.stdout)
