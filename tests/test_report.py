from __future__ import annotations

from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from covo.analysis.report import main, read_scalars, summary_table
from covo.eval.results import markdown_table, write_json

SCALARS = {
    "reward/mean": [0.1, 0.5, 0.3],
    "reward/num_answers": [3.0, 2.0, 2.0],
    "diag/accuracy": [0.2, 0.4, 0.6],
    "train/kl": [0.0, 0.02, 0.01],
    "rollout/len_mean": [100.0, 80.0, 90.0],
    "perf/tokens_per_s": [50.0, 70.0, 60.0],
}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    with SummaryWriter(str(run / "tensorboard")) as writer:
        for tag, values in SCALARS.items():
            for step, value in enumerate(values):
                writer.add_scalar(tag, value, global_step=step)
    return run


def test_read_scalars_and_summary(run_dir):
    scalars = read_scalars(run_dir)
    assert set(scalars) == set(SCALARS)
    assert scalars["train/kl"] == [(0, 0.0), (1, pytest.approx(0.02)), (2, pytest.approx(0.01))]
    lines = summary_table(scalars).splitlines()
    # main metrics first in their fixed order, then the rest alphabetically
    assert [line.split(" | ")[0][2:] for line in lines[2:]] == [
        "reward/mean", "diag/accuracy", "train/kl", "rollout/len_mean",
        "perf/tokens_per_s", "reward/num_answers",
    ]  # fmt: skip
    rows = {line.split(" | ")[0][2:]: line for line in lines[2:]}
    assert rows["reward/mean"] == "| reward/mean | 0.3 | 0.5 (max) | 1 | 3 |"
    assert rows["train/kl"] == "| train/kl | 0.01 | 0 (min) | 0 | 3 |"
    assert rows["rollout/len_mean"] == "| rollout/len_mean | 90 | 80 (min) | 1 | 3 |"
    assert rows["perf/tokens_per_s"] == "| perf/tokens_per_s | 60 | 70 (max) | 1 | 3 |"


def test_a_resumed_run_keeps_the_later_value_per_step(run_dir):
    with SummaryWriter(str(run_dir / "tensorboard" / "version_1")) as writer:
        writer.add_scalar("reward/mean", 0.9, global_step=2)
        writer.add_scalar("reward/mean", 0.4, global_step=3)
    series = read_scalars(run_dir)["reward/mean"]
    assert series == [(0, pytest.approx(0.1)), (1, pytest.approx(0.5)), (2, pytest.approx(0.9)),
                      (3, pytest.approx(0.4))]  # fmt: skip


def test_main_prints_the_table_and_writes_plots(run_dir, capsys):
    main([str(run_dir)])
    out = capsys.readouterr().out
    assert "| reward/mean | 0.3 | 0.5 (max) | 1 | 3 |" in out
    for name in ["reward", "accuracy", "kl", "length"]:
        png = run_dir / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plot: {png}" in out


def test_a_dir_without_events_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err
        == f"error: no metrics.jsonl or TensorBoard event files under {tmp_path / 'empty'}\n"
    )


def test_markdown_table_in_percent_with_a_mean_row():
    totals = {
        "gsm8k": {"items": 20, "pass@1": 0.25, "maj@4": 0.5, "pass@4": 0.4},
        "math500": {"items": 10, "pass@1": 0.1, "pass@4": 0.2},
    }
    assert markdown_table(totals).splitlines() == [
        "| benchmark | items | pass@1 | pass@4 | maj@4 |",
        "|---|---:|---:|---:|---:|",
        "| gsm8k | 20 | 25.0 | 40.0 | 50.0 |",
        "| math500 | 10 | 10.0 | 20.0 | - |",
        # pass@1 (25 + 10) / 2 = 17.5, pass@4 (40 + 20) / 2 = 30; maj@4 from gsm8k only
        "| mean | 30 | 17.5 | 30.0 | 50.0 |",
    ]
    assert "mean" not in markdown_table({"gsm8k": totals["gsm8k"]})


def test_eval_results_of_a_multirun_merge_into_one_table(tmp_path, capsys):
    jobs = {"0_benchmark=gsm8k": "gsm8k", "1_benchmark=math500": "math500", "2_seed=1": "gsm8k"}
    for job, name in jobs.items():
        write_json(
            {"totals": {name: {"items": 4, "pass@1": 0.5}}}, tmp_path / job / "eval_results.json"
        )
    main(["--eval", str(tmp_path)])
    rows = [line.split(" | ")[0][2:] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["gsm8k (0_benchmark=gsm8k)", "math500", "gsm8k (2_seed=1)", "mean"]


def test_peak_and_final_accuracy_and_the_alarm_step(tmp_path, capsys):
    run = tmp_path / "run"
    with SummaryWriter(str(run / "tensorboard")) as writer:
        for step, value in [(0, 0.1), (5, 0.4), (8, 0.4), (11, 0.2)]:
            writer.add_scalar("val/accuracy", value, global_step=step)
        for step, value in enumerate([0, 0, 0, 1, 1, 0]):
            writer.add_scalar("collapse/alarm", value, global_step=step)
    main([str(run)])
    lines = capsys.readouterr().out.splitlines()
    # the first of two equal peaks; the alarm's first step, though it fell back later
    assert lines[1:3] == [
        "val/accuracy: peak 0.4 at step 5, final 0.2 at step 11",
        "collapse alarm: first at step 3",
    ]


def test_a_run_without_alarm_or_validation_says_so(run_dir, capsys):
    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for step in range(3):
            writer.add_scalar("collapse/alarm", 0.0, global_step=step)
    main([str(run_dir)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:3] == ["val/accuracy: not logged", "collapse alarm: none in 3 steps"]


def write_job(root: Path, name: str, overrides: list[str], scalars: dict[str, list[float]]):
    """A finished training job as a Hydra multirun leaves it: overrides and TensorBoard events."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    with SummaryWriter(str(job / "tensorboard")) as writer:
        for tag, values in scalars.items():
            for step, value in enumerate(values):
                writer.add_scalar(tag, value, global_step=step)


def test_compare_groups_seeds_and_reports_t_intervals(tmp_path, capsys):
    # final val/accuracy of covo over seeds 0.2, 0.4, 0.6: mean 0.4, sd 0.2, t(0.975, 2) = 4.303,
    # half-width 4.303 * 0.2 / sqrt(3) = 0.4968; best values 0.5, 0.5, 0.6.
    for seed, (val, diag) in enumerate([([0.5, 0.2], [0.6, 0.8]), ([0.5, 0.4], [0.7, 0.7]),
                                        ([0.3, 0.6], [0.5, 0.9])]):  # fmt: skip
        write_job(tmp_path, f"{seed}_reward=covo,seed={seed}",
                  ["reward=covo", f"seed={seed}", "threads=1"],
                  {"val/accuracy": val, "diag/reward_accuracy": diag})  # fmt: skip
    write_job(tmp_path, "3_reward=majority,seed=0", ["reward=majority", "seed=0", "threads=1"],
              {"val/accuracy": [0.1, 0.3]})  # fmt: skip
    (tmp_path / "4_reward=majority,seed=1" / ".hydra").mkdir(parents=True)
    (tmp_path / "4_reward=majority,seed=1" / ".hydra" / "overrides.yaml").write_text(
        "- reward=majority\n- seed=1\n- threads=1\n"
    )
    main(["--compare", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "shared overrides: threads=1"
    assert lines[3] == "| metric | reward=covo (3 seeds) | reward=majority (1 seeds) |"
    rows = {line.split(" | ")[0][2:]: line for line in lines[5:] if line.startswith("| ")}
    assert rows["val/accuracy final"] == "| val/accuracy final | 0.4 [-0.09683, 0.8968] | 0.3 |"
    # best: 0.5, 0.5, 0.6 -> mean 0.5333, sd 0.05774, half-width 4.303 * 0.05774 / sqrt(3) = 0.1434
    assert rows["val/accuracy best"] == "| val/accuracy best | 0.5333 [0.3899, 0.6768] | 0.3 |"
    # per run the mean over steps: 0.7, 0.7, 0.7 -> no spread; majority logged none
    assert rows["diag/reward_accuracy (mean)"] == (
        "| diag/reward_accuracy (mean) | 0.7 [0.7, 0.7] | - |"
    )
    assert lines[-2] == "reward=covo: seeds 0, 1, 2; reward=majority: seeds 0"
    assert lines[-1] == f"skipped (no TensorBoard events): {tmp_path / '4_reward=majority,seed=1'}"


def test_compare_without_hydra_jobs_is_a_one_line_error(run_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--compare", str(run_dir)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: no Hydra jobs (.hydra/overrides.yaml) under {run_dir}\n"
    )
