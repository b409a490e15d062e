"""The toy reasoner: its data's splits, its worked solutions, tokenizer, shipped weights and
the determinism of its pretraining."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import fields

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
    lab = toy_reasoner.Lab(**{k: record[k] for k in ("seed", "steps", "batch_size")})
    pairs = toy_reasoner.corpus(lab, lab.steps * lab.batch_size)
    pretraining = [prompt.removeprefix("Question: ").strip() for prompt, _ in pairs]
    assert len(train) == 2000 and len(val) == 64 and len(set(val)) == 64
    assert len(set(pretraining)) > 10_000
    assert shared_problems(train, val) == 0
    assert shared_problems(pretraining, train + val) == 0
    # another seed draws other training problems from the same part: still none held out
    settings = {**toy_reasoner.Lab().problems(), "split": "train"}
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
    labs = [toy_reasoner.Lab(seed=seed, steps=3, batch_size=8) for seed in (0, 0, 1)]
    runs = [toy_reasoner.pretrain(lab, log_every=0) for lab in labs]
    (a, _, ra), (b, _, rb), (c, _, _) = runs
    assert ra["final_loss"] == rb["final_loss"]
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_slips_scatter_as_far_as_the_flag_says():
    rng = random.Random(0)
    offsets = set()
    for _ in range(400):
        solution, value = worked_solution("5 + 5", rng, slip_rate=1.0, slip_scatter=5)
        offsets.add(value - 10)
    # one step, so the answer is off by the one slip: every offset in 1..5 either way, no other
    assert offsets == {-5, -4, -3, -2, -1, 1, 2, 3, 4, 5}
    # the default scatter draws from the list the shipped lab was pretrained with
    rng_a, rng_b = random.Random(3), random.Random(3)
    draws = [worked_solution("7 - 2 + 4", rng_a, 0.5)[0] for _ in range(50)]
    assert draws == [worked_solution("7 - 2 + 4", rng_b, 0.5, slip_scatter=3)[0] for _ in range(50)]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--slip-rate", "1.0"], "--slip-rate must be in [0, 1), got 1.0"),
        (["--slip-rate", "-0.1"], "--slip-rate must be in [0, 1), got -0.1"),
        (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
        (["--slip-scatter", "0"], "--slip-scatter must be an integer >= 1, got 0"),
        (
            ["--max-operands", "2", "--min-operands", "3"],
            "--max-operands must be >= --min-operands",
        ),
        (["--operators", "+/"], "--operators must be some of +-*, got '+/'"),
        (["--schedule", "linear"], "--schedule must be constant or cosine, got 'linear'"),
    ],
)
def test_bad_pretraining_flags_end_with_one_line_naming_the_flag(flags, message, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "covo.models.toy_reasoner", "--out", str(tmp_path / "lab"), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "lab").exists()  # nothing was written


@pytest.mark.parametrize("lab", ["toy_reasoner", "toy_calibrated"])
def test_every_shipped_lab_records_its_flags_and_matches_its_data_config(lab, tmp_path):
    record = json.loads((toy_reasoner.WEIGHTS / lab / "pretraining.json").read_text())
    settings = toy_reasoner.Lab(**{f.name: record[f.name] for f in fields(toy_reasoner.Lab)})
    data = "toy_arithmetic" if lab == "toy_reasoner" else lab
    cfg = compose_config("train", [f"model={lab}", f"data={data}"], tmp_path)
    for split in (cfg.data.train, cfg.data.val):
        assert split.min_operands == settings.min_operands
        assert split.max_operands == settings.max_operands
        assert split.max_value == settings.max_value
        assert list(split.operators) == list(settings.operators)
        assert dict(split.parts) == toy_reasoner.PARTS
    loaded = hydra.utils.instantiate(cfg.model)
    assert loaded.name == lab
    assert loaded.model.config.hidden_size == settings.hidden_size
    assert loaded.model.config.num_hidden_layers == settings.num_layers
    # pretraining within its budget: at most 10 minutes of one core
    assert record["cpu_seconds"] <= 600
