"""`python -m covo.score`: one explained line per prompt, D reproducible from the dumped ids."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate

from covo.analysis.score import score
from covo.data.jsonl import DataError
from covo.infra.errors import exit_on_user_error
from covo.rewards.base import Group
from covo.rewards.covo.scorer import NaiveScorer, PrefixSharedScorer

torch.set_num_threads(1)
BASE = ["model=tiny", "device=cpu", "threads=1"]
ITEMS = [
    {
        "prompt": "What is 2 + 2?",
        "responses": [
            "First, 2 + 2 = 4.\nSo the total is 4.\nThe answer is: \\boxed{4}",
            "We compute 2 + 2 = 5.\nThus \\boxed{5}",
            "Step 1: add.\n\\[ 2 + 2 = 4 \\]\nAnswer: \\boxed{4}",
            "No idea.",
        ],
        "answer": "4",
    },
    {
        "prompt": "What is 3 * 4?",
        "responses": [
            "3 * 4 = 12.\n\nThe answer is: \\boxed{12}\n",
            "3 * 4 = 7.\nSo \\boxed{7}",
            "Add 3 four times: 12.\nCheck: 12.\n\\boxed{12}",
        ],
        "answer": "12",
    },
]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def run(tmp: Path, lines: list[str], *overrides: str):
    """Score `lines` with the tiny model; returns (cfg, summary, output records)."""
    source = write_jsonl(tmp / "in.jsonl", lines)
    cfg = compose_config(
        "score", [*BASE, f"input={source}", f"output={tmp / 'out.jsonl'}", *overrides], tmp
    )
    summary = score(cfg)
    return cfg, summary, read_output(tmp)


def read_output(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "out.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", params=["covo", "covo_paper"])
def scored(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    lines = [json.dumps(item) for item in ITEMS]
    overrides = [f"reward={request.param}", "dump_ids=true", f"plot={tmp / 'curves.png'}"]
    return run(tmp, lines, *overrides)


def reference_group(loaded, prompt: str, responses: list[str], label: str | None) -> Group:
    """The group built without the score command's code: chat template, own tokenisation,
    per-token statistics from the full logits of one forward per response."""
    tok, model = loaded.tokenizer, loaded.model
    messages = [{"role": "user", "content": prompt}]
    chat = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok.encode(chat, add_special_tokens=False)
    response_ids, logprobs, entropy, certainty = [], [], [], []
    for text in responses:
        ids = tok.encode(text, add_special_tokens=False)
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + ids])).logits[0]
        logp = logits[len(prompt_ids) - 1 : -1].float().log_softmax(-1)
        response_ids.append(ids)
        logprobs.append(logp[torch.arange(len(ids)), ids])
        entropy.append(-(logp.exp() * logp).sum(-1))
        certainty.append(-logp.mean(-1) - math.log(logp.shape[-1]))  # KL(uniform || policy)
    return Group(prompt_ids, response_ids, responses, logprobs, entropy, certainty, label)


def test_one_line_per_prompt_with_clusters_in_sample_order(scored):
    _, summary, records = scored
    assert len(records) == 2
    # "4" (responses 0, 2) opens cluster 0, "5" cluster 1; "No idea." has no answer
    first, second = records
    assert [(c["answer"], c["members"], c["correct"]) for c in first["clusters"]] == [
        ("4", [0, 2], True),
        ("5", [1], False),
    ]
    assert [r["cluster"] for r in first["responses"]] == [0, 1, 0, -1]
    assert [r["correct"] for r in first["responses"]] == [True, False, True, False]
    assert [c["members"] for c in second["clusters"]] == [[0, 2], [1]]
    rewards = [r["reward"] for rec in records for r in rec["responses"]]
    assert summary["prompts"] == 2 and summary["responses"] == 7
    assert summary["mean_reward"] == pytest.approx(sum(rewards) / 7)
    assert {"diag/auroc", "diag/reward_accuracy"} <= set(summary)


def test_steps_and_D_shapes(scored):
    cfg, _, records = scored
    first = records[0]["responses"]
    # newline-ended lines are steps; the display-math line is a step of its own
    assert first[0]["steps"] == [
        "First, 2 + 2 = 4.\n",
        "So the total is 4.\n",
        "The answer is: \\boxed{4}",
    ]
    assert first[2]["steps"] == ["Step 1: add.\n", "\\[ 2 + 2 = 4 \\]\n", "Answer: \\boxed{4}"]
    # the empty line joins the step after it, the trailing newline the last step
    assert records[1]["responses"][0]["steps"] == [
        "3 * 4 = 12.\n",
        "\nThe answer is: \\boxed{12}\n",
    ]
    assert first[3]["D"] is None and first[3]["steps"] is None
    for item, record in zip(ITEMS, records):
        K, P = len(record["clusters"]), len(record["prompt_ids"])
        for r, text in zip(record["responses"][:3], item["responses"]):
            # byte-level BPE: the step spans decode back to the response exactly
            assert "".join(r["steps"]) == text
            T = len(r["step_ends"])
            assert len(r["D"]) == len(r["ratios"]) == T and all(len(row) == K for row in r["D"])
            ends = [P + e for e in r["step_ends"]]
            paper = cfg.reward.include_prompt_state
            assert r["state_ends"] == ([P] + ends[:-1] if paper else ends)


def test_recorded_reward_equals_the_reward_on_the_same_group(scored):
    cfg, _, records = scored
    loaded = instantiate(cfg.model)
    reward = instantiate(cfg.reward)
    for item, record in zip(ITEMS, records):
        prompt = cfg.prompt_template.format(problem=item["prompt"])
        group = reference_group(loaded, prompt, item["responses"], item["answer"])
        assert group.prompt_ids == record["prompt_ids"]
        assert group.response_ids == [r["response_ids"] for r in record["responses"]]
        expected = reward(group, PrefixSharedScorer(loaded.model, loaded.tokenizer))
        got = record["responses"]
        assert [r["reward"] for r in got] == pytest.approx(expected.rewards, abs=1e-5)
        assert [c["verdict"] for c in record["clusters"]] == expected.verdicts
        for name in ("consistency", "volatility", "curiosity"):
            want = [None if math.isnan(v) else v for v in expected.components[name]]
            assert [r[name] for r in got] == pytest.approx(want, abs=1e-5)
    if cfg.reward.curiosity.weight > 0:  # covo_paper: curiosity from the real token log-probs
        assert all(r["curiosity"] > 0 for r in records[0]["responses"][:3])


def test_dumped_ids_reproduce_D_with_the_naive_scorer(scored):
    cfg, _, records = scored
    loaded = instantiate(cfg.model)
    tok = loaded.tokenizer
    for record in records:
        template, newline = record["template_ids"], record["newline_ids"]
        response = record["responses"][0]
        context = record["prompt_ids"] + response["response_ids"]
        answer_only = cfg.reward.distance_tokens == "answer"
        newline_scored = cfg.reward.newline_scored and not answer_only
        cuts, branches, scored_from = [], [], []
        for end in response["state_ends"]:
            last = tok.decode(context[end - 1 : end])
            # the token holding the newline before the template is scored (released code): the
            # state's own, or the one the newline makes with its last token, or the newline
            glued = tok.encode(last + "\n", add_special_tokens=False)
            if "\n" in last:
                cut, prefix = (end - 1, context[end - 1 : end]) if newline_scored else (end, [])
            elif newline_scored and glued != tok.encode(last, add_special_tokens=False) + newline:
                cut, prefix = end - 1, glued
            else:
                cut, prefix = end, newline
            cuts.append(cut)
            branches.append([prefix + c["answer_ids"] for c in record["clusters"]])
            starts = []
            for c in record["clusters"]:
                ids, common = c["answer_ids"], 0
                while common < len(template) and ids[common] == template[common]:
                    common += 1
                start = min(common, len(ids) - 1) if answer_only else 0
                starts.append(0 if newline_scored else len(prefix) + start)
            scored_from.append(starts)
        naive = NaiveScorer(loaded.model, tok).branch_nll(context, cuts, branches, scored_from)
        torch.testing.assert_close(
            torch.stack(naive), torch.tensor(response["D"]), atol=1e-4, rtol=0
        )


def test_guarded_rewards_and_the_states_table(tmp_path, capsys):
    # T = 1, 2, 1: with min_states=2 only the second response counts, so "5" has no value and
    # "4" is the only cluster top1 can pass, whatever the model's distances
    item = {
        "prompt": "What is 2 + 2?",
        "responses": ["\\boxed{4}", "First 2 + 2 = 4.\nSo \\boxed{4}", "\\boxed{5}"],
        "answer": "4",
    }
    _, summary, [record] = run(tmp_path, [json.dumps(item)], "reward=covo_guarded")
    assert [r["reward"] for r in record["responses"]] == [1.0, 1.0, 0.0]
    assert [c["verdict"] for c in record["clusters"]] == [True, False]
    assert summary["diag/reward_states_1"] == pytest.approx(0.5)
    assert summary["diag/reward_states_2_3"] == 1.0
    assert summary["diag/one_state_share"] == pytest.approx(2 / 3)
    assert summary["diag/balanced_reward_accuracy"] == 1.0
    assert summary["diag/singleton_pass_share"] == 0.0
    out = capsys.readouterr().out
    assert "| 1 | 2 | 0.667 | 0.5000 | 0.500 |\n| 2-3 | 1 | 0.333 | 1.0000 | 1.000 |" in out
    assert "passed clusters: correct 1.0000, singletons 0.0000; correct clusters passed " in out


def test_plot_is_a_png(scored):
    cfg = scored[0]
    assert Path(cfg.plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_answers_no_correctness_and_the_plot_is_skipped(tmp_path, capsys):
    lines = [json.dumps({k: v for k, v in item.items() if k != "answer"}) for item in ITEMS]
    _, summary, records = run(tmp_path, lines, f"plot={tmp_path / 'curves.png'}")
    assert not any("correct" in r for rec in records for r in rec["responses"])
    assert "diag/auroc" not in summary
    assert not (tmp_path / "curves.png").exists()
    assert "plot skipped" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"prompt": "x", ', "malformed JSON (Expecting property name enclosed in double quotes)"),
        ('{"responses": ["a"]}', "missing key 'prompt'"),
        ('{"prompt": "x", "responses": []}', "'responses' must be a non-empty list"),
        (
            '{"prompt": "x", "responses": ["a", "b"], "response_ids": [[5, 6]]}',
            "'response_ids' must hold one list of token ids per response",
        ),
    ],
)
def test_bad_line_names_file_and_line_and_keeps_earlier_lines(tmp_path, capsys, bad, message):
    source = write_jsonl(tmp_path / "in.jsonl", [json.dumps(ITEMS[1]), bad])
    cfg = compose_config(
        "score", [*BASE, f"input={source}", f"output={tmp_path / 'out.jsonl'}"], tmp_path
    )
    with pytest.raises(DataError):
        score(cfg)
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(score)(cfg)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {source}:2: {message}\n"
    assert len(read_output(tmp_path)) == 1


def test_sampled_ids_are_scored_instead_of_retokenised_text(tmp_path):
    loaded = instantiate(compose_config("score", BASE, tmp_path).model)
    texts = ITEMS[1]["responses"]
    # each text's ids, the first split into one token per character: same text, other ids
    ids = [loaded.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    ids[0] = [i for ch in texts[0] for i in loaded.tokenizer.encode(ch, add_special_tokens=False)]
    assert loaded.tokenizer.decode(ids[0]) == texts[0] and len(ids[0]) > len(
        loaded.tokenizer.encode(texts[0], add_special_tokens=False)
    )
    line = json.dumps({**ITEMS[1], "response_ids": ids})
    _, _, records = run(tmp_path, [line], "dump_ids=true")
    assert [r["response_ids"] for r in records[0]["responses"]] == ids


@pytest.mark.parametrize("name", ["majority", "self_certainty"])
def test_simple_rewards_ignore_the_scorer(tmp_path, name):
    cfg, _, records = run(tmp_path, [json.dumps(ITEMS[0])], f"reward={name}")
    got = records[0]["responses"]
    assert all(r["D"] is None and r["steps"] is None for r in got)
    if name == "majority":  # "4" holds 2 of 4 responses
        assert [r["reward"] for r in got] == [1.0, 0.0, 1.0, 0.0]
    else:  # mean per-token KL(uniform || policy) of each response
        loaded = instantiate(cfg.model)
        prompt = cfg.prompt_template.format(problem=ITEMS[0]["prompt"])
        group = reference_group(loaded, prompt, ITEMS[0]["responses"], None)
        want = [v.mean().item() for v in group.token_self_certainty]
        assert [r["reward"] for r in got] == pytest.approx(want, abs=1e-5)


def test_prompt_template_is_the_data_config_one(tmp_path):
    data = compose_config("train", ["model=tiny"], tmp_path).data.prompt_template
    assert compose_config("score", BASE, tmp_path).prompt_template == data


def test_command_line(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [json.dumps(item) for item in ITEMS])
    overrides = [f"input={source}", f"output={tmp_path / 'out.jsonl'}", f"paths.log_dir={tmp_path}"]
    proc = subprocess.run(
        [sys.executable, "-m", "covo.score", *BASE, *overrides],
        cwd=tmp_path,  # the config is found from the package, not from the working directory
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"scored 2 prompts, 7 responses, mean reward \d\.\d{4}", lines[-1])
    assert re.fullmatch(r"reward accuracy \d\.\d{4}, AUROC \d\.\d{4}", lines[-2])
    assert len(read_output(tmp_path)) == 2


# The examples where the released code's answers and steps differ from a lenient reading.
TRUNCATED = "Add 2 and 3 to get 5, and then multiply by 7 to get"
CUT_BOX = "So \\boxed{3}. Then we get \\boxed{\\frac{1"
COLON_CHAIN = "\n".join(["l0:", "l1:"] + [f"l{j}" for j in range(2, 17)] + ["So \\boxed{5}"])
EXAMPLES = [
    {
        "prompt": "What is (2 + 3) * 7?",
        "responses": ["2 + 3 = 5.\nSo \\boxed{5}"] * 15 + [TRUNCATED],
    },
    {"prompt": "What is 2 + 3?", "responses": [CUT_BOX, COLON_CHAIN, "\\boxed{4}"]},
]


def stripped_steps(response: dict) -> list[list[str]]:
    return [[line.strip() for line in s.split("\n") if line.strip()] for s in response["steps"]]


def test_released_answers_and_steps_on_the_examples(tmp_path):
    lines = [json.dumps(item) for item in EXAMPLES]
    for name in ("covo", "lenient", "paper"):
        (tmp_path / name).mkdir()
    _, _, (first, second) = run(tmp_path / "covo", lines, "reward=covo")
    # no box in the truncated response: no answer, so one cluster (K = 1) and every reward 0
    assert [r["answer"] for r in first["responses"]] == ["5"] * 15 + [None]
    assert len(first["clusters"]) == 1
    assert all(r["reward"] == 0.0 for r in first["responses"])
    # an unclosed last box is no answer, not the earlier "3"
    assert [r["answer"] for r in second["responses"]] == [None, "5", "4"]
    # 18 lines: "l0:" takes "l1:" in and the pair is not looked at again; the 17 units left
    # are regrouped into 15 chunks, the last two of two units each
    want = [["l0:", "l1:"]] + [[f"l{j}"] for j in range(2, 14)]
    assert stripped_steps(second["responses"][1]) == want + [
        ["l14", "l15"],
        ["l16", "So \\boxed{5}"],
    ]

    # the default run's extractor reads the last number: "7" is a second cluster
    _, _, (lenient, _) = run(
        tmp_path / "lenient", lines, "reward=covo", "reward.extractor=boxed_or_last_number"
    )
    assert [c["answer"] for c in lenient["clusters"]] == ["5", "7"]
    # covo_paper folds the colon chain into one step: 16 units -> 14 single ones, then two
    _, _, (_, paper) = run(tmp_path / "paper", lines, "reward=covo_paper")
    want = [["l0:", "l1:", "l2"]] + [[f"l{j}"] for j in range(3, 16)] + [["l16", "So \\boxed{5}"]]
    assert stripped_steps(paper["responses"][1]) == want
