"""covo rewards under sharded parameters (FSDP2 on 2 gloo processes, CPU): each process scores
its own groups with its own number of forwards, without a hang, and the rewards equal those of
the whole model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytest.importorskip("trl")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["covo_paper"])
def test_fsdp2_processes_with_different_forward_counts_score_as_the_whole_model(name, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    script = Path(__file__).with_name("trl_fsdp_ranks.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)]
    try:
        done = subprocess.run(
            [*command, str(tmp_path), name], env=env, capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the sharded reward hung (processes out of step on their forwards)")
    assert done.returncode == 0, done.stderr[-3000:]
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
