"""Training data against the benchmarks: shared items are counted per benchmark and refused."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from conftest import ROOT, compose_config
from omegaconf import OmegaConf

from covo.data.contamination import benchmark_files, fingerprint, overlap
from covo.data.datamodule import PromptDataModule
from covo.data.jsonl import DataError, read_jsonl

GSM8K = read_jsonl("package:gsm8k")


def own_items(n: int) -> list[dict]:
    return [
        {"problem": f"Tom has {i} apples and buys 3 more. How many now?", "answer": str(i + 3)}
        for i in range(n)
    ]


def sharing_gsm8k(n_own: int) -> list[dict]:
    """Items 5 and 700 of GSM8K (the second in other case, spacing and `$` signs) + own items."""
    altered = GSM8K[700]["problem"].upper().replace(" ", "  \n") + " $ $"
    return [GSM8K[5], {"problem": altered, "answer": "1"}, *own_items(n_own)]


def test_fingerprint_evens_out_case_spacing_and_dollars_only():
    assert fingerprint("What is $2+2$?") == fingerprint("what  is\n2 + 2 ?")
    assert fingerprint("What is 2+2?") != fingerprint("What is 2-2?")
    assert fingerprint("ｆｕｌｌ width") == fingerprint("full width")  # NFKC


def test_every_benchmark_config_is_checked(tmp_path):
    names = set(benchmark_files(tmp_path))
    assert names == {"amc23", "commonsenseqa", "gpqa", "gsm8k", "math500", "olympiad"}
    assert benchmark_files(tmp_path)["amc23"][0] == tmp_path / "amc23.jsonl"
    # without a benchmark folder only the shipped ones
    assert set(benchmark_files(None)) == {"gsm8k", "math500"}


def test_overlap_counts_items_per_benchmark(tmp_path):
    problems = [item["problem"] for item in sharing_gsm8k(20)]
    problems.append(read_jsonl("package:math500")[3]["problem"])
    # a benchmark file in the folder is read; missing ones are skipped
    (tmp_path / "amc23.jsonl").write_text(json.dumps({"problem": problems[4], "answer": "7"}))
    assert overlap(problems, tmp_path) == {"amc23": 1, "gsm8k": 2, "math500": 1}
    assert overlap(problems[2:], tmp_path / "missing") == {"math500": 1}


def test_fitting_refuses_data_sharing_items_unless_allowed(tmp_path, caplog):
    module = PromptDataModule(train=sharing_gsm8k(10), val=[], benchmark_dir=str(tmp_path))
    with pytest.raises(DataError) as err:
        module.setup("fit")
    assert str(err.value) == (
        "training data holds benchmark items: 2 gsm8k items among the 12 training items; "
        "data.allow_benchmark_overlap=true trains on them anyway"
    )
    module.setup("validate")  # only fitting is checked
    PromptDataModule(train=own_items(10), val=[]).setup("fit")
    allowed = PromptDataModule(train=sharing_gsm8k(10), val=[], allow_benchmark_overlap=True)
    with caplog.at_level(logging.WARNING):
        allowed.setup("fit")
    assert "training on benchmark items: 2 gsm8k items among the 12 training items" in caplog.text


def test_released_recipe_refuses_a_file_sharing_items_with_gsm8k(tmp_path):
    rows = [
        {"problem": it["problem"], "solution": f"\\boxed{{{it['answer']}}}"}
        for it in sharing_gsm8k(40)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    # the recipe names no data of its own: the path is required
    cfg = compose_config("train", ["experiment=covo_released_qwen7b"], tmp_path)
    assert OmegaConf.is_missing(cfg.data.train, "path")
    command = ["experiment=covo_released_qwen7b", "model=tiny", "trainer=cpu"]
    command += ["trainer.devices=1", "strategy=auto", "threads=1", f"paths.log_dir={tmp_path}"]
    proc = subprocess.run(
        [sys.executable, "train.py", *command, f"data.train.path={path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: training data holds benchmark items: 2 gsm8k items among the 10 training items; "
        "data.allow_benchmark_overlap=true trains on them anyway"
    )
