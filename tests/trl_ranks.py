"""Run by test_trl_integration under `torch.distributed.run --nproc_per_node=2` (gloo, CPU):
two GRPO steps with 4 rows per process and groups of 4, recording the prompts of every covo
reward call; then a 2-rows-per-process setup, whose bind must refuse. Writes rank<r>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from test_trl_integration import CovoReward, build_tiny, trainer_with

torch.set_num_threads(1)


class Recorded(CovoReward):
    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls.append([p[0]["content"] for p in prompts])
        return super().__call__(prompts, completions, completion_ids, **kwargs)


def main(out: Path) -> None:
    reward = Recorded("covo")
    reward.calls = []
    trainer = trainer_with(reward, out / "whole", per_device_train_batch_size=4)
    trainer.train()
    rank = trainer.accelerator.process_index
    try:
        trainer_with(CovoReward("covo"), out / "split", build_tiny(), per_device_train_batch_size=2)
        refused = ""
    except ValueError as err:
        refused = str(err)
    record = {"calls": reward.calls, "refused": refused, "world": trainer.accelerator.num_processes}
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
