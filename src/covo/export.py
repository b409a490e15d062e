"""The trained policy as a Hugging Face folder that `from_pretrained` loads directly."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L

from covo.distributed import full_state_dict


def export_policy(module, directory: Path, trainer: L.Trainer) -> None:
    """Write the policy (gathered whole when sharded) and its tokenizer from rank 0."""
    state = full_state_dict(module.policy)  # a collective when sharded: every rank calls it
    if trainer.global_rank != 0:
        return
    directory.mkdir(parents=True, exist_ok=True)
    policy = module.policy
    policy.save_pretrained(directory, state_dict={k: v.detach().cpu() for k, v in state.items()})
    module.tokenizer.save_pretrained(directory)
