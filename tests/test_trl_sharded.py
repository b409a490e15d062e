"""covo rewards under sharded parameters (FSDP2 on 2 gloo processes, CPU): each process scores
its own groups with its own number of forwards, without a hang, and the rewards equal those of
the whole model; a real GRPOTrainer run under accelerate's FSDP2 plugin does the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_trl_integration import N, oracle_group

pytest.importorskip("trl")
from covo.integrations.trl import CovoReward  # noqa: E402
from covo.models.loading import build_tiny  # noqa: E402
from covo.rewards.base import label_for  # noqa: E402
from covo.rewards.covo.scorer import NaiveScorer  # noqa: E402


def run_ranks(script: str, *args: str, timeout: int = 300) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    script = str(Path(__file__).with_name(script))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", script]
    try:
        done = subprocess.run(
            [*command, *args], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the sharded run hung (processes out of step on their forwards)")
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["covo_paper"])
def test_fsdp2_processes_with_different_forward_counts_score_as_the_whole_model(name, tmp_path):
    run_ranks("trl_fsdp_ranks.py", str(tmp_path), name)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["was_sharded"]
        assert rank["local_numel"] < rank["numel"]  # each process holds a part only
        assert rank["sharded"] == pytest.approx(rank["whole"], abs=1e-5)
    assert len(ranks[0]["whole"]) == 8 and len(ranks[1]["whole"]) == 4
    assert len(set(ranks[0]["whole"])) > 1
    # the processes ran different numbers of forwards, sharded as whole
    assert ranks[0]["forwards"][1] == ranks[0]["forwards"][0]
    assert ranks[1]["forwards"][1] == ranks[1]["forwards"][0]
    assert ranks[0]["forwards"][0] != ranks[1]["forwards"][0]


def oracle_rewards(call: dict, weights: dict, temperature: float) -> list[float]:
    """The call's rewards in one process from the weights the call scored with, in float64:
    per completion one forward over prompt + completion (`oracle_group`), CoVo's distances
    from `NaiveScorer` (each state and branch fed whole)."""
    loaded = build_tiny()
    loaded.model.load_state_dict(weights)
    model, tokenizer = loaded.model.double().eval(), loaded.tokenizer
    judge = CovoReward("covo").reward
    eos, out = tokenizer.eos_token_id, []
    for s in range(0, len(call["prompt_ids"]), N):
        rows = call["completion_ids"][s : s + N]
        responses = [ids[:-1] if ids and ids[-1] == eos else ids for ids in rows]
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in responses]
        group = oracle_group(model, call["prompt_ids"][s], responses, texts, temperature)
        group = replace(group, truth=label_for(judge, None))
        out += judge(group, NaiveScorer(model, tokenizer)).rewards
    return out


@pytest.mark.slow
def test_grpo_training_under_accelerates_fsdp2_plugin_scores_as_one_process(tmp_path):
    """Two GRPO steps (`trainer.train()`) with the covo reward, its capture installed, under
    accelerate's FSDP2 plugin on 2 gloo processes (tests/trl_fsdp_train_ranks.py says what
    differs from a GPU run). Rank 1's rows all end after 6 tokens while rank 0 decodes 16, and
    in the first step the statistics come from the batched forwards at 20 tokens a forward, so
    the processes run different numbers of forwards: the run ends, the parameters stay sharded,
    and every reward returned and logged equals a single-process float64 oracle of the same
    completions at the weights of its step."""
    run_ranks("trl_fsdp_train_ranks.py", str(tmp_path), timeout=420)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    weights = [torch.load(tmp_path / f"weights{step}.pt") for step in range(2)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # trained
    oracle = [
        [oracle_rewards(rank["calls"][step], weights[step], rank["temperature"]) for rank in ranks]
        for step in range(2)
    ]
    for r, rank in enumerate(ranks):
        assert (rank["distributed_type"], rank["fsdp_version"]) == ("DistributedType.FSDP", 2)
        assert rank["step"] == 2 and len(rank["calls"]) == 2
        for step, call in enumerate(rank["calls"]):
            for when in ("before", "after"):  # each process holds a part of the parameters
                assert call[when]["local"] < call[when]["full"], (r, step, when)
            assert call["after"]["dtensor"]
            assert call["logged"]["perf/stats_from_generate"] == float(step == 1)
            assert call["rewards"] == pytest.approx(oracle[step][r], abs=1e-5), (r, step)
            mean = sum(oracle[step][r]) / len(oracle[step][r])
            assert call["logged"]["reward/mean"] == pytest.approx(mean, abs=1e-5)
    for step in range(2):  # TRL's mean over the processes
        logged = [e for e in ranks[0]["log_history"] if e.get("step") == step + 1]
        both = oracle[step][0] + oracle[step][1]
        assert logged[0]["rewards/covo/mean"] == pytest.approx(sum(both) / len(both), abs=1e-5)
    first = [rank["calls"][0] for rank in ranks]
    assert len(set(oracle[0][0] + oracle[0][1])) > 1  # the rewards tell completions apart
    assert max(map(len, first[0]["completion_ids"])) == 16
    assert max(map(len, first[1]["completion_ids"])) == 6  # rank 1's rows all ended early
    assert first[0]["forwards"] != first[1]["forwards"]
