from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytest
import torch
from conftest import CONF_DIR, SHARED_DATA, compose_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from covo.eval import evaluate
from covo.eval.grading import ChoiceGrader, MathGrader
from covo.eval.harness import grade, load_policy_checkpoint, totals_of
from covo.eval.results import RESULTS_FILE
from covo.launch.settings import check_eval
from covo.models.loading import build_tiny

# problems of decreasing length, so batching by length reorders them
MATH_ROWS = [
    {
        "problem": "A farmer has 12 cows and buys 7 more cows. How many cows?",
        "answer": "\\boxed{19}",
    },
    {"problem": "What is 3 * 4?", "answer": "\\boxed{12}"},
    {"problem": "2 + 2?", "answer": "\\boxed{4}"},
    {"problem": "unused", "answer": "\\boxed{0}"},
]
CHOICE_ROWS = [
    {"problem": "Which is a fruit?\n(A) apple\n(B) stone\n(C) cloud", "solution": "\\boxed{A}"},
    {"problem": "Pick B.\n(A) x\n(B) y", "solution": "\\boxed{B}"},
    {"problem": "Sky colour?\n(A) blue\n(B) green\n(C) red\n(D) none", "solution": "\\boxed{A}"},
]
RUN = ["model=tiny", "threads=1", "max_new_tokens=12", "batch_size=2", "max_samples=3"]


@pytest.fixture
def bench_dir(tmp_path) -> Path:
    directory = tmp_path / "benchmarks"
    directory.mkdir()
    for name, rows in [("amc23", MATH_ROWS), ("gpqa", CHOICE_ROWS)]:
        (directory / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return directory


def eval_cfg(tmp_path: Path, *overrides: str):
    return compose_config("eval", [*RUN, *overrides], tmp_path / "out")


def test_sampled_run_writes_consistent_json_tensorboard_and_table(tmp_path, bench_dir, capsys):
    ckpt = tmp_path / "last.ckpt"
    policy = build_tiny(seed=1).model
    torch.save(
        {
            "state_dict": {f"policy.{k}": v for k, v in policy.state_dict().items()},
            "global_step": 7,
        },
        ckpt,
    )
    cfg = eval_cfg(
        tmp_path,
        "benchmark=[amc23,gpqa]",
        f"benchmark_dir={bench_dir}",
        "num_samples=4",
        "temperature=1.0",
        "k=[1,2,4,8]",
        f"ckpt_path={ckpt}",
    )
    results = evaluate(cfg)

    out = Path(cfg.paths.output_dir)
    assert json.loads((out / RESULTS_FILE).read_text()) == json.loads(json.dumps(results))
    assert (results["model"], results["step"]) == ("tiny", 7)
    assert results["config"]["benchmark_dir"] == str(bench_dir)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    table = capsys.readouterr().out
    for name, rows, gold in [
        ("amc23", MATH_ROWS, ["19", "12", "4"]),
        ("gpqa", CHOICE_ROWS, ["A", "B", "A"]),
    ]:
        records, totals = results["records"][name], results["totals"][name]
        assert [r["problem"] for r in records] == [r["problem"] for r in rows[:3]]
        assert [r["label"] for r in records] == gold
        for r in records:
            assert len(r["responses"]) == len(r["answers"]) == len(r["correct"]) == 4
        flags = [sum(r["correct"]) / 4 for r in records]
        assert totals["pass@1"] == pytest.approx(sum(flags) / 3)
        assert set(totals) == {
            "items",
            "pass@1",
            "pass@2",
            "pass@4",
            "maj@2",
            "maj@4",
            "answered",
            "truncated",
        }  # k=8 > num_samples is skipped
        assert totals["items"] == 3
        for key in ("pass@2", "maj@4"):
            assert totals[key] == pytest.approx(sum(r["metrics"][key] for r in records) / 3)
        (point,) = events.Scalars(f"eval/{name}/pass@1")
        assert (point.step, point.value) == (7, pytest.approx(totals["pass@1"]))
        assert f"| {name} | 3 | " in table
    gpqa = results["records"]["gpqa"]
    assert all(c == (a == r["label"]) for r in gpqa for a, c in zip(r["answers"], r["correct"]))
    assert "| mean | 6 | " in table
    assert "| benchmark | items | pass@1 | pass@2 | pass@4 | maj@2 | maj@4 |" in table
    assert "eval/mean/pass@1" in events.Tags()["scalars"]


def test_sampling_is_seeded_and_greedy_reports_pass_at_1(tmp_path, bench_dir):
    sampled = [
        "benchmark=amc23",
        f"benchmark_dir={bench_dir}",
        "num_samples=2",
        "temperature=1.0",
        "max_samples=2",
    ]

    def responses(*overrides):
        results = evaluate(eval_cfg(tmp_path, *sampled, *overrides))
        return [r["responses"] for r in results["records"]["amc23"]]

    assert responses("seed=3") == responses("seed=3")
    assert responses("seed=3") != responses("seed=4")
    greedy = evaluate(eval_cfg(tmp_path, "benchmark=amc23", f"benchmark_dir={bench_dir}"))
    assert set(greedy["totals"]["amc23"]) == {"items", "pass@1", "answered", "truncated"}


def test_grade_scores_planted_responses():
    items = [{"problem": "p", "label": "5"}]
    texts = [["so \\boxed{5}", "I get 4", "no idea"]]
    (record,) = grade(MathGrader(), items, texts, [[False, False, True]], [1, 2, 3])
    assert record["answers"] == ["5", "4", None]
    assert record["correct"] == [True, False, False]
    # n=3, c=1: pass@2 = 1 - C(2,2)/C(3,2) = 2/3; maj@2: "5" vs "4" tie -> "5"; maj@3 same
    assert record["metrics"] == pytest.approx(
        {"pass@1": 1 / 3, "pass@2": 2 / 3, "pass@3": 1.0, "maj@2": 1.0, "maj@3": 1.0}
    )
    totals = totals_of([record])
    assert totals["answered"] == pytest.approx(2 / 3) and totals["truncated"] == pytest.approx(
        1 / 3
    )
    (record,) = grade(
        ChoiceGrader(), [{"problem": "p", "label": "B"}], [["Answer: (B)"]], [[False]], [1]
    )
    assert record["correct"] == [True]


def test_policy_checkpoint_loads_only_matching_policy_weights(tmp_path):
    trained, fresh = build_tiny(seed=1).model, build_tiny(seed=0).model
    state = {f"policy.{k}": v for k, v in trained.state_dict().items()}
    state["reference.lm_head.weight"] = torch.zeros(1)  # other modules' weights are ignored
    torch.save({"state_dict": state, "global_step": 3}, tmp_path / "a.ckpt")
    assert load_policy_checkpoint(fresh, str(tmp_path / "a.ckpt")) == 3
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    bigger = build_tiny(hidden_size=32).model.state_dict()
    torch.save({"state_dict": {f"policy.{k}": v for k, v in bigger.items()}}, tmp_path / "b.ckpt")
    with pytest.raises(ValueError, match="does not fit"):
        load_policy_checkpoint(fresh, str(tmp_path / "b.ckpt"))
    torch.save({"state_dict": {"model.x": torch.zeros(1)}}, tmp_path / "c.ckpt")
    with pytest.raises(ValueError, match="no 'policy"):
        load_policy_checkpoint(fresh, str(tmp_path / "c.ckpt"))


def test_settings_reject_greedy_repeats_and_keep_fitting_k(tmp_path):
    with pytest.raises(ValueError, match="greedy"):
        check_eval(eval_cfg(tmp_path, "num_samples=4"))
    assert check_eval(eval_cfg(tmp_path, "num_samples=4", "temperature=0.7")) == [1, 4]
    with pytest.raises(ValueError, match="dtype"):
        check_eval(eval_cfg(tmp_path, "dtype=float32"))


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "benchmark").glob("*.yaml")))
def test_every_benchmark_config_loads(name, tmp_path):
    cfg = eval_cfg(tmp_path, f"benchmark={name}", f"benchmark_dir={SHARED_DATA}")
    benchmark = hydra.utils.instantiate(cfg.benchmarks[name])
    if not str(benchmark.path).startswith("package:") and not Path(benchmark.path).is_file():
        pytest.skip(f"{benchmark.path} not present")
    items = benchmark.load(max_samples=5)
    assert len(items) == 5
    for item in items:
        assert item["prompt"].startswith(f"Question: {item['problem']}\nPlease reason")
        if isinstance(benchmark.grader, ChoiceGrader):
            assert item["label"] in "ABCDEFGHIJ"
        else:
            assert "boxed" not in item["label"]
