"""scripts/trl_example.py, the GRPOConfig and dataset that scripts/trl_covo.py and
scripts/bench_trl_memory.py share: the step they describe is the step TRL runs."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import ROOT

pytest.importorskip("trl")


def load_example():
    spec = importlib.util.spec_from_file_location(
        "trl_example", ROOT / "scripts" / "trl_example.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_micro_batches_make_one_generation_and_one_update():
    example = load_example()
    # the memory benchmark's step: 8 x 8 rows sampled at once, trained 8 rows at a time
    config = example.grpo_config(
        prompts=8, generations=8, max_new_tokens=64, steps=1, seed=0, micro=8, prefix="t-"
    )
    assert config.generation_batch_size == 64  # TRL samples all 64 rows in one generate call
    assert config.steps_per_generation == 8 == config.gradient_accumulation_steps  # one update
    assert (config.num_generations, config.max_completion_length) == (8, 64)
    assert (config.use_cpu, config.bf16, config.beta, config.temperature) == (True, False, 0, 1)
    # the example's step: every row in one micro-batch
    config = example.grpo_config(prompts=2, generations=4, max_new_tokens=96, steps=2, seed=0)
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (8, 1)
    assert config.generation_batch_size == 8


def test_micro_batch_that_does_not_divide_the_rows_is_refused():
    example = load_example()
    with pytest.raises(SystemExit, match=r"--micro 3 must divide prompts x generations = 8"):
        example.grpo_config(prompts=2, generations=4, max_new_tokens=8, steps=1, seed=0, micro=3)


def test_dataset_is_chat_prompts_with_their_answers():
    rows = load_example().dataset(3, seed=0)
    assert rows.column_names == ["prompt", "problem", "answer"]
    first = rows[0]
    assert first["problem"] == "Compute 1 + 13." and first["answer"] == "14"
    assert first["prompt"] == [
        {
            "role": "user",
            "content": "Question: Compute 1 + 13.\nPlease reason step by step, and put your final "
            "answer within \\boxed{}\n",
        }
    ]
