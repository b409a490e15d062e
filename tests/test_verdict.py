"""The results JSON: written from an outcome study's run folders, and the headline table
recomputed from it alone, against numbers computed by hand."""

import json

import numpy as np
import pytest
from conftest import ROOT
from scipy import stats

from covo.analysis.verdict import brief, collect_results, main, markdown, verdict

N = 2  # samples per problem; 4 problems; test evaluations at steps 0, 5, 10
BASE = {"0": [1, 1, 0, 2], "1": [1, 1, 1, 1], "2": [2, 1, 0, 1]}  # every reward's step 0: 0.5
END = {
    "random": {"0": [1, 0, 0, 2], "1": [1, 1, 0, 1], "2": [2, 1, 1, 1]},  # 0.375 0.375 0.625
    "majority": {"0": [2, 2, 1, 2], "1": [2, 1, 1, 2], "2": [2, 2, 1, 2]},  # .875 .75 .875
    "covo": {"0": [1, 1, 0, 1], "1": [1, 1, 1, 1], "2": [1, 1, 0, 1]},  # .375 .5 .375
}
MIDDLE = [2, 1, 0, 2]  # step 5 of every run: 0.625
VALIDATION = {  # majority's validation peaks at step 5, the others' at step 0
    "random": [0.5, 0.45, 0.4],
    "majority": [0.5, 0.6, 0.55],
    "covo": [0.5, 0.5, 0.45],
}


def run(reward: str, seed: str) -> dict:
    counts = [BASE[seed], MIDDLE, END[reward][seed]]
    return {
        "steps": [0, 5, 10],
        "sampled_accuracy": [sum(c) / (N * 4) for c in counts],
        "greedy_accuracy": [0.75, 0.75, 1.0 if reward == "majority" else 0.75],
        "maj_accuracy": [0.75, 0.75, 0.75],
        "pass_accuracy": [1.0, 1.0, 1.0 if reward != "covo" else 0.75],
        "per_problem_correct": counts,
        "validation": {"steps": [0, 5, 10], "sampled_accuracy": VALIDATION[reward]},
    }


def results() -> dict:
    return {
        "study": "hand",
        "split": "test",
        "setting": {"num_samples": N, "problems": 4, "primary": ["majority", "covo"]},
        "rewards": {r: {s: run(r, s) for s in BASE} for r in END},
        "sharpening": {"0.3": {"sampled_accuracy": 0.6}, "1.0": {"sampled_accuracy": 0.5}},
    }


def t_cell(values):
    x = np.asarray(values, float)
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return pytest.approx((x.mean(), x.mean() - half, x.mean() + half))


def test_headline_numbers_match_hand_computation():
    table = verdict(results())
    n, paired = table["numbers"], table["paired"]
    gain = n["majority"]["sampled_gain"]
    assert (gain["value"], gain["low"], gain["high"]) == t_cell([0.375, 0.25, 0.375])
    assert n["random"]["sampled_gain"]["value"] == pytest.approx(-0.125 / 3)
    # two-stage bootstrap: the mean of the per-problem gains is the same end gain
    assert n["majority"]["sampled_gain_bootstrap"]["value"] == pytest.approx(1 / 3)
    # step chosen on validation: majority's step 5 (test 0.625 - 0.5), the others' step 0
    assert n["majority"]["peak_on_validation"]["value"] == pytest.approx(0.125)
    assert n["covo"]["peak_on_validation"]["value"] == 0.0
    assert n["majority"]["greedy_gain"]["value"] == pytest.approx(0.25)
    assert n["covo"]["pass_gain"]["value"] == pytest.approx(-0.25)
    # against random, per seed: majority 0.5, 0.375, 0.25; covo 0, 0.125, -0.25
    d = paired["majority"]
    assert (d["value"], d["low"], d["high"]) == t_cell([0.5, 0.375, 0.25])
    p_majority = 2 * stats.t.sf(0.375 / (0.125 / np.sqrt(3)), 2)
    covo = np.array([0.0, 0.125, -0.25])
    t_covo = covo.mean() / (covo.std(ddof=1) / np.sqrt(3))
    p_covo = 2 * stats.t.sf(abs(t_covo), 2)
    assert d["bootstrap"]["value"] == pytest.approx(0.375)  # mean of the per-problem differences
    assert d["p"] == pytest.approx(p_majority)
    assert paired["covo"]["p"] == pytest.approx(p_covo)
    assert d["p_holm"] == pytest.approx(2 * p_majority)  # the smaller of two: x 2
    assert paired["covo"]["p_holm"] == pytest.approx(max(p_covo, 2 * p_majority))
    # beyond sharpening: the final accuracy's lower t bound above the best temperature's 0.6
    final = t_cell([0.875, 0.75, 0.875])
    assert n["majority"]["final"]["low"] == pytest.approx(final.expected[1])
    assert final.expected[1] > 0.6
    assert n["majority"]["beyond_sharpening"] is True
    assert n["covo"]["beyond_sharpening"] is False
    assert table["sharpening_best"]["temperature"] == "0.3"


def test_table_names_what_is_primary_and_what_beats_sharpening():
    data = results()
    text = markdown(data, verdict(data))
    majority = next(line for line in text.splitlines() if line.startswith("| majority |"))
    assert "+0.333 [" in majority and "| yes |" in majority
    assert next(line for line in text.splitlines() if line.startswith("| random |")).endswith(
        "| - | - | - | 0.458 [0.100, 0.817] | no |"
    )
    assert "best 0.600 at T = 0.3" in text


def test_brief_table_orders_by_gain_and_reads_the_premise_from_its_own_file():
    data = results()
    premise = {
        "rewards": {"majority": {"auroc": {"value": 0.91}}, "covo": {"auroc": {"value": 0.5734}}}
    }
    lines = brief(verdict(data), premise).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| `majority`",
        "| `random`",
        "| `covo`",
    ]
    p_majority = 2 * stats.t.sf(0.375 / (0.125 / np.sqrt(3)), 2)
    assert lines[2] == (
        "| `majority` | 0.910 | 3 | +0.333 [+0.154, +0.513] | +0.250 [+0.250, +0.250] | "
        f"+0.375 [+0.064, +0.686] | {2 * p_majority:.3f} | yes |"
    )
    assert lines[3].startswith("| `random` | - | 3 | -0.042 [") and lines[3].endswith(
        "| - | - | no |"
    )
    assert lines[4].startswith("| `covo` | 0.573 | 3 |")
    # a reward outside the primary family shows its unadjusted p, marked
    data["setting"]["primary"] = ["majority"]
    covo = brief(verdict(data)).splitlines()[4]
    assert covo.startswith("| `covo` | - |") and covo.endswith(" (not primary) | no |")


def write_run(study, reward, seed, lines):
    folder = study / "runs" / reward / f"seed_{seed}"
    folder.mkdir(parents=True)
    (folder / "heldout.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (folder / "result.json").write_text("{}")
    return folder


def record(step, split, counts, **extra):
    record = {"step": step, "problems": 2, "num_samples": 4}
    record |= {"sampled_accuracy": sum(counts) / 8, "greedy_accuracy": 0.5}
    record |= {"maj_accuracy": 0.5, "pass_accuracy": 1.0, "per_problem_correct": counts}
    return record | ({"split": split} if split else {}) | extra


def test_results_json_from_run_folders_and_back(tmp_path):
    study = tmp_path / "study"
    write_run(
        study,
        "random",
        0,
        [record(0, None, [1, 1]), record(0, "test", [2, 2]), record(5, None, [2, 1])]
        + [record(5, "test", [1, 1]), record(5, "test", [3, 1])],  # step 5 again after a resume
    )
    unfinished = write_run(study, "covo", 0, [record(0, "test", [2, 2])])
    (unfinished / "result.json").unlink()
    out = collect_results(study, "s", {"lr": 3.3e-5}, {"1.0": {"sampled_accuracy": 0.5}})
    assert out["setting"] == {"num_samples": 4, "problems": 2, "lr": 3.3e-5}
    assert list(out["rewards"]) == ["random"]
    seed = out["rewards"]["random"]["0"]
    assert seed["steps"] == [0, 5]
    assert seed["sampled_accuracy"] == [0.5, 0.5]
    assert seed["per_problem_correct"] == [[2, 2], [3, 1]]
    assert seed["validation"] == {"steps": [0, 5], "sampled_accuracy": [0.25, 0.375]}
    path = tmp_path / "results.json"
    main(["write", str(study), str(path), "--name", "s"])
    assert json.loads(path.read_text())["rewards"] == out["rewards"]


def test_missing_results_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["table", str(tmp_path / "nope.json")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.json'}: no such file"


def test_the_readme_headline_is_the_results_file():
    # the README's table, recomputed from docs/results alone: the finished study, ten seeds
    docs = ROOT / "docs"
    results = json.loads((docs / "results" / "headline_lr3.3e-5_kl0.1.json").read_text())
    premise = json.loads((docs / "results" / "calibrated_premise.json").read_text())
    assert not results["setting"]["partial"] and results["split"] == "test"
    assert {reward: len(runs) for reward, runs in results["rewards"].items()} == {
        reward: 10
        for reward in ("ground_truth", "majority", "covo", "covo_paper", "random", "seq_logprob")
    }
    table = brief(verdict(results), premise)
    assert table in (docs.parent / "README.md").read_text()
