"""The trained policy as a Hugging Face folder that `from_pretrained` loads directly."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L

from covo.infra.distributed import full_state_dict
from covo.models.lora import base_of, is_lora, merged_state


def export_policy(module, directory: Path, trainer: L.Trainer, adapters: bool = False) -> None:
    """Write the policy (gathered whole when sharded) and its tokenizer from rank 0.

    A LoRA policy is written as its base model with the adapters merged into the weights, or,
    with `adapters`, as peft's adapter folder (`PeftModel.from_pretrained(base, directory)`).
    """
    state = full_state_dict(module.policy)  # a collective when sharded: every rank calls it
    if trainer.global_rank != 0:
        return
    directory.mkdir(parents=True, exist_ok=True)
    policy = module.policy
    state = {k: v.detach().cpu() for k, v in state.items()}
    if adapters and is_lora(policy):
        policy.save_pretrained(directory, state_dict=state)
    else:
        base_of(policy).save_pretrained(directory, state_dict=merged_state(policy, state))
    module.tokenizer.save_pretrained(directory)
