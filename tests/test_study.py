"""`python -m covo.study`: samples drawn once and cached, every reward scored in one pass,
numbers that follow from hand-made samples, and re-scoring from the cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate
from omegaconf import open_dict

import covo.analysis.study_samples
from covo.analysis.study import PLOT_FILE, RESULTS_FILE, study
from covo.analysis.study_samples import load_or_sample, samples_path
from covo.data.jsonl import DataError
from covo.models.toy_reasoner import PACKAGED

torch.set_num_threads(1)
TINY = [
    "model=tiny",
    "device=cpu",
    "threads=1",
    "problems.num_problems=3",
    "sampling.num_samples=4",
    "sampling.max_new_tokens=24",
    "sampling.batch_size=2",
    "bootstrap.resamples=300",
]


def config(tmp: Path, *overrides: str, out: Path | None = None):
    """The study config with its sample cache under `tmp`, writing into `out` (else `tmp`)."""
    cache = f"paths.cache_dir={tmp / 'cache'}"
    # the random tiny model writes numbers, never a box
    extractor = "reward_extractor=boxed_or_last_number"
    return compose_config("study", [*TINY, cache, extractor, *overrides], out or tmp)


def without_times(results: dict) -> dict:
    """The results minus wall times, which differ between runs."""
    out = json.loads(json.dumps(results))
    for key in ("sampling_seconds", "scoring_seconds", "config"):
        out.pop(key)
    for metrics in out["rewards"].values():
        metrics.pop("seconds")
    for prompt in out["prompts"]:
        prompt.pop("group_seconds")
        for outcome in prompt["rewards"].values():
            outcome.pop("seconds")
    return out


def test_tiny_study_end_to_end_and_rescored_from_its_cache(tmp_path, monkeypatch, capsys):
    cfg = config(tmp_path, "rewards=[covo,majority,entropy]")
    first = study(cfg)
    samples = Path(first["samples"])
    assert samples.parent == tmp_path / "cache" / "study" and samples.suffix == ".jsonl"
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    problems = instantiate(cfg.problems)
    assert [line["prompt"] for line in lines] == [p["problem"] for p in problems]
    assert [line["answer"] for line in lines] == [p["answer"] for p in problems]
    tokenizer = instantiate(cfg.model).tokenizer
    for line in lines:  # 4 samples each, the text of their ids; cut only at the 24-token limit
        decoded = [tokenizer.decode(ids, skip_special_tokens=True) for ids in line["response_ids"]]
        assert line["responses"] == decoded and len(decoded) == 4
        assert line["truncated"] == [len(ids) == 24 for ids in line["response_ids"]]
    side = json.loads(samples.with_name(samples.name + ".json").read_text())
    assert side["problems"] == 3 and side["seconds"] > 0
    written = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert (
        written["rewards"]["covo"]["reward_accuracy"] == first["rewards"]["covo"]["reward_accuracy"]
    )
    assert (tmp_path / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "| reward | reward accuracy | AUROC |" in out and "| covo |" in out
    # CoVo fed its scorer (branches only: the trajectories come from the statistics forward)
    assert first["rewards"]["covo"]["scorer_tokens"]["value"] > 0
    assert first["rewards"]["majority"]["scorer_tokens"]["value"] == 0

    def no_sampling(*args, **kwargs):
        raise AssertionError("the cached samples should have been read")

    monkeypatch.setattr(covo.analysis.study_samples, "sample", no_sampling)
    again = study(config(tmp_path, "rewards=[covo,majority,entropy]", out=tmp_path / "again"))
    assert again["samples"] == first["samples"]
    assert (tmp_path / "again" / RESULTS_FILE).exists()
    assert without_times(again) == without_times(first)


def test_interrupted_sampling_resumes_with_the_same_samples(tmp_path):
    cfg = config(tmp_path, "sampling.batch_size=1", f"samples={tmp_path / 'whole.jsonl'}")
    loaded = instantiate(cfg.model)
    problems = instantiate(cfg.problems)
    whole, _ = load_or_sample(loaded, problems, cfg)
    with open_dict(cfg):
        cfg.samples = str(tmp_path / "resumed.jsonl")
    first_line = whole.read_text().splitlines(keepends=True)[0]
    (tmp_path / "resumed.jsonl.partial").write_text(first_line)  # stopped after one batch
    resumed, side = load_or_sample(loaded, problems, cfg)
    assert resumed.read_text() == whole.read_text()
    assert side["problems"] == 3


HAND_MADE = [
    # label 4: clusters {4: 2 members}, {5: 1}; one response without an answer
    ("What is 2 + 2?", "4", ["\\boxed{4}", "so \\boxed{4}", "\\boxed{5}", "no idea"]),
    # label 12: clusters {7: 2}, {12: 1}, {9: 1}; the majority is wrong
    ("What is 3 * 4?", "12", ["\\boxed{7}", "\\boxed{7}", "\\boxed{12}", "\\boxed{9}"]),
    # label 3: one cluster (K = 1): no verdicts to judge
    ("What is 1 + 2?", "3", ["\\boxed{3}"] * 4),
]


@pytest.fixture
def hand_made(tmp_path) -> tuple[Path, Path]:
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"problem": p, "answer": a}) + "\n" for p, a, _ in
                                HAND_MADE))  # fmt: skip
    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        "".join(
            json.dumps({"prompt": p, "answer": a, "responses": r}) + "\n" for p, a, r in HAND_MADE
        )  # fmt: skip
    )
    return problems, samples


def hand_made_config(tmp_path, problems: Path, samples: Path, *overrides: str):
    cfg = config(tmp_path, f"samples={samples}", "bootstrap.resamples=200", *overrides)
    with open_dict(cfg):
        cfg.problems = {"_target_": "covo.data.jsonl.read_jsonl", "path": str(problems)}
    return cfg


def test_majority_numbers_of_hand_made_samples(tmp_path, hand_made):
    results = study(hand_made_config(tmp_path, *hand_made, "rewards=[majority,entropy]"))
    majority = results["rewards"]["majority"]
    # clusters judged: prompt 1 both right (2 / 2), prompt 2 only {9} right (1 / 3): 3 / 5
    assert majority["reward_accuracy"]["value"] == pytest.approx(0.6)
    # one passing cluster per judged prompt: 2 / 5
    assert majority["pass_frac"]["value"] == pytest.approx(0.4)
    # the majority answer is right for prompts 1 and 3: 2 / 3
    assert majority["label_accuracy"]["value"] == pytest.approx(2 / 3)
    # vote shares of 7 correct and 5 wrong responses: 30 of 35 pairs ordered right (ties 1/2)
    assert majority["auroc"]["value"] == pytest.approx(30 / 35)
    # the model is right on 2/4, 1/4 and 4/4 of the samples
    assert results["model_accuracy"]["value"] == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    bins = results["bins"]
    assert [(b["prompts"], b["compared"]) for b in bins] == [(0, 0), (1, 1), (1, 1), (1, 0)]
    assert bins[1]["reward_accuracy"]["majority"]["value"] == pytest.approx(1 / 3)
    assert bins[2]["reward_accuracy"]["majority"]["value"] == pytest.approx(1.0)
    assert bins[3]["reward_accuracy"]["majority"]["value"] is None
    entropy = results["rewards"]["entropy"]
    # entropy passes its top response's cluster: paired difference of the same prompts
    difference = results["differences"]["entropy"]["reward_accuracy"]
    assert difference["value"] == pytest.approx(
        entropy["reward_accuracy"]["value"] - majority["reward_accuracy"]["value"]
    )
    assert difference["low"] <= difference["value"] <= difference["high"]


def test_verdict_and_state_numbers_of_hand_made_samples(tmp_path, hand_made, capsys):
    cfg = hand_made_config(tmp_path, *hand_made, "rewards=[majority,covo_guarded]")
    results = study(cfg)
    majority = results["rewards"]["majority"]
    # judged clusters: correct {4} passed, {12} rejected -> 1/2; wrong {5} rejected,
    # {7} passed, {9} rejected -> 2/3
    assert majority["correct_pass_rate"]["value"] == pytest.approx(1 / 2)
    assert majority["wrong_reject_rate"]["value"] == pytest.approx(2 / 3)
    assert majority["balanced_reward_accuracy"]["value"] == pytest.approx(7 / 12)
    # passed {4} (2 members, correct) and {7} (2 members, wrong)
    assert majority["pass_precision"]["value"] == pytest.approx(1 / 2)
    assert majority["singleton_pass_share"]["value"] == 0.0
    assert majority["one_state_share"]["value"] is None  # majority counts no states
    guarded = results["rewards"]["covo_guarded"]
    # every response is one line (T = 1): with min_states=2 no cluster has a value, none passes
    assert guarded["reward_accuracy"]["value"] == pytest.approx(3 / 5)
    assert guarded["balanced_reward_accuracy"]["value"] == pytest.approx(1 / 2)
    assert guarded["pass_precision"]["value"] is None
    # scored: the 3 answered responses of prompt 1 and the 4 of prompt 2, 3 of them correct
    assert guarded["one_state_share"]["value"] == 1.0
    assert guarded["reward_states_1"]["value"] == 0.0
    assert guarded["correct_states_1"]["value"] == pytest.approx(3 / 7)
    assert guarded["reward_states_2_3"]["value"] is None
    difference = results["differences"]["covo_guarded"]["balanced_reward_accuracy"]
    assert difference["value"] == pytest.approx(1 / 2 - 7 / 12)
    assert results["prompts"][1]["rewards"]["majority"]["wrong_rejected"] == 1
    assert results["prompts"][0]["rewards"]["covo_guarded"]["states"]["1"] == [3, 0.0, 2]
    out = capsys.readouterr().out
    assert "| reward | balanced reward accuracy | correct clusters passed |" in out
    assert "| covo_guarded | 1.000 [1.000, 1.000] | 0.000 [0.000, 0.000] | - | - |" in out
    assert "| reward - majority | Δ reward accuracy | Δ balanced reward accuracy |" in out


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["rewards=[majority,nope]"], "rewards: unknown reward 'nope'"),
        (["rewards=[covo]"], "baseline 'majority' is not one of rewards ['covo']"),
        (["accuracy_bins=[0.2,1.0]"], "accuracy_bins must rise from <= 0 to >= 1"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, hand_made, overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        study(hand_made_config(tmp_path, *hand_made, *overrides))


def test_samples_of_other_problems_are_rejected(tmp_path, hand_made):
    problems, samples = hand_made
    lines = samples.read_text().splitlines(keepends=True)
    samples.write_text(lines[1] + lines[0] + lines[2])
    with pytest.raises(DataError, match=f"{samples}:1: sampled for another problem"):
        study(hand_made_config(tmp_path, problems, samples, "rewards=[majority]"))


def test_problems_without_answers_are_rejected(tmp_path, hand_made):
    problems, samples = hand_made
    problems.write_text(json.dumps({"problem": "What is 2 + 2?", "answer": None}) + "\n")
    with pytest.raises(DataError, match="problems: item 1 has no answer"):
        study(hand_made_config(tmp_path, problems, samples, "rewards=[majority]"))


def test_a_reward_scoring_the_same_branches_reuses_the_calls(tmp_path):
    """covo_guarded scores the very branches covo scores: after covo it feeds nothing, and
    its outcomes equal those of a study that scores it alone."""
    both = study(
        config(tmp_path, "rewards=[covo,covo_guarded]", "baseline=null", out=tmp_path / "both")
    )
    alone = study(
        config(tmp_path, "rewards=[covo_guarded]", "baseline=null", out=tmp_path / "alone")
    )
    covo_tokens = both["rewards"]["covo"]["scorer_tokens"]["value"]
    assert covo_tokens > 0
    assert both["rewards"]["covo_guarded"]["scorer_tokens"]["value"] == 0
    # alone, covo_guarded feeds exactly the tokens covo fed
    assert alone["rewards"]["covo_guarded"]["scorer_tokens"]["value"] == covo_tokens
    for with_covo, by_itself in zip(both["prompts"], alone["prompts"]):
        got, want = with_covo["rewards"]["covo_guarded"], by_itself["rewards"]["covo_guarded"]
        assert got["scores"] == want["scores"] and got["hits"] == want["hits"]


def test_weights_written_anew_in_the_same_folder_are_sampled_anew(tmp_path):
    folder = tmp_path / "lab"
    shutil.copytree(PACKAGED, folder)
    cfg = compose_config(
        "study",
        ["model=toy_reasoner", f"model.weights={folder}", f"paths.cache_dir={tmp_path}"],
        tmp_path,
    )
    before = samples_path(cfg)
    assert samples_path(cfg) == before  # the same files: the same cached samples
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # a new pretraining run writes the folder again
    os.utime(weights, ns=(1, 1))
    assert samples_path(cfg) != before


def test_a_reward_yaml_of_your_own_folder_is_found_through_hydra_searchpath(tmp_path):
    """`covo study` composes each reward as a run does: a YAML in the user's folder, on the
    run's `hydra.searchpath`, scores the samples as covo's own option of that class does."""
    (tmp_path / "conf" / "reward").mkdir(parents=True)
    (tmp_path / "conf" / "reward" / "my_share.yaml").write_text(
        "_target_: covo.rewards.majority.VoteShareReward\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "covo", "study", *TINY, "reward_extractor=boxed_or_last_number",
         f"paths.cache_dir={tmp_path / 'cache'}", "rewards=[vote_share,my_share]",
         "baseline=vote_share",
         f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"hydra.run.dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rewards = json.loads((tmp_path / "out" / RESULTS_FILE).read_text())["rewards"]
    assert rewards["my_share"]["reward_accuracy"] == rewards["vote_share"]["reward_accuracy"]
    assert rewards["my_share"]["auroc"] == rewards["vote_share"]["auroc"]
