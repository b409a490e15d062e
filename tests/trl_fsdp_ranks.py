"""Run by test_trl_sharded under `torch.distributed.run --nproc_per_node=2` (gloo, CPU): a covo
reward bound to a GRPOTrainer scores each process's own rows (rank 0 both groups of
GROUPS_OF_FOUR, rank 1 the first group only, so their forward counts differ) first on the
whole model, then with its parameters sharded by FSDP2 (`fully_shard` on every decoder layer
and the root). Writes rank<r>.json: both rewards, the forwards each ran, and whether the
parameters were sharded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from test_trl_integration import CovoReward, build_tiny, trainer_with, trl_rows
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

torch.set_num_threads(1)


def main(out: Path, name: str) -> None:
    reward = CovoReward(name, ["stats_token_budget=40"])
    loaded = build_tiny()
    trainer = trainer_with(reward, out / "run", loaded)
    rank = trainer.accelerator.process_index
    inputs, prompts, completions, ids = trl_rows(trainer.processing_class)
    rows = slice(None) if rank == 0 else slice(0, 4)
    call = dict(
        prompts=prompts[rows],
        completions=completions[rows],
        completion_ids=ids[rows],
        answer=[x["answer"] for x in inputs[rows]],
    )
    forwards = []
    loaded.model.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    whole = reward(**call)
    whole_forwards = len(forwards)
    model = loaded.model
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    forwards.clear()
    under_fsdp = reward(**call)
    still_sharded = all(isinstance(p, DTensor) for p in model.parameters())
    record = {
        "whole": whole,
        "sharded": under_fsdp,
        "forwards": [whole_forwards, len(forwards)],
        "was_sharded": sharded and still_sharded,
        "local_numel": sum(p.to_local().numel() for p in model.parameters()),
        "numel": sum(p.numel() for p in model.parameters()),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
