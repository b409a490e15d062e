"""scripts/sharpening_baseline.py evaluates the untrained policy as the held-out callback does
at step 0: at the callback's temperature its numbers are a training run's step-0 record, and
greedy decoding does not depend on the temperature."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_RUN

from covo.callbacks.heldout_eval import METRICS, read_records

RUN = [
    *TINY_RUN,
    "data=toy_arithmetic",
    "data.val.num_problems=4",
    "data.test.num_problems=3",
    "trainer.precision=32-true",
    "threads=1",
    "callbacks=heldout_eval",
    "callbacks.heldout_eval.num_samples=3",
    "callbacks.heldout_eval.batch_size=2",
]


def run(*command: str) -> None:
    subprocess.run([sys.executable, *command], cwd=ROOT, check=True, capture_output=True,
                   timeout=600)  # fmt: skip


@pytest.mark.slow  # two processes: a 1-step run and the script (~100 s on a loaded machine)
def test_at_the_callbacks_temperature_it_gives_the_step_0_record(tmp_path):
    run("train.py", *RUN, "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}")
    base = read_records(tmp_path / "run" / "heldout.jsonl", "test")[0]
    assert base["step"] == 0
    out = tmp_path / "sharpening.json"
    run("scripts/sharpening_baseline.py", "--out", str(out), "--temperatures", "1.0", "0.5",
        "--", *RUN)  # fmt: skip
    results = json.loads(out.read_text())
    assert set(results) == {"1", "0.5"}
    assert {k: results["1"][k] for k in METRICS} == {k: base[k] for k in METRICS}
    assert results["1"]["problems"] == 3 and results["1"]["num_samples"] == 3
    assert results["0.5"]["greedy_accuracy"] == base["greedy_accuracy"]
