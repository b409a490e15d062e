"""The toy reasoner: its data's splits, its worked solutions, tokenizer, shipped weights and
the determinism of its pretraining."""

from __future__ import annotations

import json
import random

import hydra
import pytest
import torch
from conftest import compose_config

from covo.data.arithmetic import generate, worked_solution
from covo.data.contamination import shared_problems
from covo.models import toy_reasoner


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    cfg = compose_config(
        "train", ["model=toy_reasoner", "data=toy_arithmetic"], tmp_path_factory.mktemp("toy")
    )
    return hydra.utils.instantiate(cfg.data)


def test_worked_solutions_by_hand():
    assert worked_solution("8 + 2 - 7") == ("8 + 2 = 10\n10 - 7 = 3\nThe answer is: \\boxed{3}", 3)
    assert worked_solution("3 + 4 * 2 - 9") == (
        "4 * 2 = 8\n3 + 8 = 11\n11 - 9 = 2\nThe answer is: \\boxed{2}",
        2,
    )
    assert worked_solution("1 - 4 - 1")[0].splitlines()[1] == "-3 - 1 = -4"
    # every step slips: the first line is off by 1 to 3 and the answer carries it on
    solution, value = worked_solution("5 + 5 + 5", random.Random(0), slip_rate=1.0)
    first = int(solution.splitlines()[0].split("= ")[1])
    assert 1 <= abs(first - 10) <= 3 and value != 15
    assert solution.endswith(f"The answer is: \\boxed{{{value}}}")


def test_splits_share_no_problem(toy_data):
    train = [item["problem"] for item in toy_data.train_items]
    val = [item["problem"] for item in toy_data.val_items]
    record = json.loads((toy_reasoner.PACKAGED / "pretraining.json").read_text())
    pairs = toy_reasoner.corpus(record["steps"] * record["batch_size"], record["seed"], 0.0)
    pretraining = [prompt.removeprefix("Question: ").strip() for prompt, _ in pairs]
    assert len(train) == 2000 and len(val) == 64 and len(set(val)) == 64
    assert len(set(pretraining)) > 10_000
    assert shared_problems(train, val) == 0
    assert shared_problems(pretraining, train + val) == 0
    # another seed draws other training problems from the same part: still none held out
    settings = {**toy_reasoner.data_settings()[0], "split": "train"}
    other = generate(500, seed=7, **settings)
    assert shared_problems([i["problem"] for i in other], val + pretraining) == 0
    # without the parts, the same generator repeats held-out problems
    unsplit = generate(2000, seed=0, min_operands=3, max_operands=4, max_value=9, operators="+-")
    assert shared_problems([i["problem"] for i in unsplit], val) > 0


def test_generate_rejects_an_unknown_part():
    with pytest.raises(ValueError, match="split 'test' is not among the parts"):
        generate(4, split="test", parts={"train": 1, "val": 1})


def test_packaged_model_and_tokenizer():
    loaded = toy_reasoner.load()
    params = sum(p.numel() for p in loaded.model.parameters())
    assert 1_000_000 <= params <= 5_000_000
    tok = loaded.tokenizer
    text = "9 + 7 = 16\n16 - 25 = -9\nThe answer is: \\boxed{-9}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert "16" not in tok.convert_ids_to_tokens(ids)  # digits one token each
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Question: Compute 1 + 2 + 3.\n"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert chat.endswith("<|im_start|>assistant\n")


def test_pretraining_is_deterministic():
    torch.set_num_threads(1)
    runs = [toy_reasoner.pretrain(seed, steps=3, batch_size=8, log_every=0) for seed in (0, 0, 1)]
    (a, _, ra), (b, _, rb), (c, _, _) = runs
    assert ra["final_loss"] == rb["final_loss"]
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
