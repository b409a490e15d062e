"""Every script under scripts/ imports: a helper it calls that moved or was renamed fails here,
not in the middle of a benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_every_script_imports():
    names = sorted(p.stem for p in SCRIPTS.glob("*.py"))
    assert "bench_toy_step" in names and len(names) > 10
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)"
    done = subprocess.run(
        [sys.executable, "-c", code, *names], cwd=SCRIPTS, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1]


def test_lab_profile_table_puts_studies_of_several_models_side_by_side(tmp_path):
    """`lab_profile.py --table`: a row per study, a column per reward any study ran, `-` where
    one did not; values and intervals to three decimals, minutes rounded."""

    def study(model, dtype, accuracy, seconds, **aurocs):
        return {
            "model": model,
            "config": {"model": {"master_dtype": dtype} if dtype else {}},
            "model_accuracy": dict(zip(("value", "low", "high"), accuracy)),
            "sampling_seconds": seconds[0],
            "scoring_seconds": seconds[1],
            "rewards": {
                name: {"auroc": dict(zip(("value", "low", "high"), auroc))}
                for name, auroc in aurocs.items()
            },
        }

    studies = [
        study("smollm2_135m", "bfloat16", (0.0078, 0.0, 0.0196), (1661, 1308),
              majority=(0.344, 0.2, 0.5), covo=(0.8312, 0.5371, 0.95)),
        study("qwen_coder_15b", None, (0.75, 0.7, 0.8), (2190, 29.9),
              covo=(0.7, 0.6, 0.8), seq_logprob=(0.9, 0.85, 0.95)),
    ]  # fmt: skip
    paths = []
    for n, results in enumerate(studies):
        paths.append(tmp_path / f"{n}.json")
        paths[-1].write_text(json.dumps(results))
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "lab_profile.py"), "--table", *map(str, paths)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    head, rule, *rows = [line.split(" | ") for line in done.stdout.splitlines()]
    assert head[1:] == [
        "sampled accuracy", "majority AUROC", "covo AUROC", "seq_logprob AUROC",
        "sampling, scoring min |",
    ]  # fmt: skip
    assert rows == [
        ["| smollm2_135m (bfloat16)", "0.008 [0.000, 0.020]", "0.344 [0.200, 0.500]",
         "0.831 [0.537, 0.950]", "-", "28, 22 |"],
        ["| qwen_coder_15b (float32)", "0.750 [0.700, 0.800]", "-", "0.700 [0.600, 0.800]",
         "0.900 [0.850, 0.950]", "36, 0 |"],
    ]  # fmt: skip


def test_the_premise_study_runs_in_bf16_only_where_the_cpu_computes_it(tmp_path):
    """`verdict_runs.sh premise MODEL`: bf16 weights where covo.infra.hardware finds native
    bf16, fp32 where torch would emulate it, COVO_PREMISE_DTYPE over both."""
    fake = tmp_path / "python"  # runs the dtype probe, prints the study's command line
    fake.write_text(
        f'#!/bin/sh\nif [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\necho "$@"\n'
    )
    fake.chmod(0o755)

    def args(**env):
        done = subprocess.run(
            ["bash", str(SCRIPTS / "verdict_runs.sh"), "premise", "qwen_coder_15b", "threads=2"],
            env={**os.environ, "PYTHON": str(fake), "COVO_STUDY_DIR": str(tmp_path), **env},
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert args(COVO_NATIVE_BF16="1")[:4] == [
        "-m", "covo.study", "model=qwen_coder_15b", "model.master_dtype=bfloat16",
    ]  # fmt: skip
    assert "model.master_dtype=float32" in args(COVO_NATIVE_BF16="0")
    forced = args(COVO_NATIVE_BF16="1", COVO_PREMISE_DTYPE="float32")
    assert "model.master_dtype=float32" in forced
    assert forced[-2:] == [f"hydra.run.dir={tmp_path}/qwen_coder_15b", "threads=2"]
