"""The trained policy as a Hugging Face folder that `from_pretrained` loads directly."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import torch

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
    write_folder(module.policy, state, module.tokenizer, directory, adapters)


def write_folder(
    policy: torch.nn.Module, state: dict, tokenizer, directory: Path, adapters: bool = False
) -> None:
    """`policy` holding `state` (its whole state dict) and `tokenizer`, into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in state.items()}
    if adapters and is_lora(policy):
        policy.save_pretrained(directory, state_dict=state)
    else:
        base_of(policy).save_pretrained(directory, state_dict=merged_state(policy, state))
    tokenizer.save_pretrained(directory)


def export_checkpoint(loaded, ckpt_path: str, directory: Path, adapters: bool = False) -> int:
    """A Lightning checkpoint (a file, or the folder FSDP2 writes) as a Hugging Face folder:
    its policy weights copied into `loaded` (the run's model config, built in this process),
    written as `export_policy` writes them; returns the checkpoint's optimizer step."""
    from covo.eval.harness import load_policy_checkpoint

    step = load_policy_checkpoint(loaded.model, ckpt_path)
    write_folder(loaded.model, loaded.model.state_dict(), loaded.tokenizer, directory, adapters)
    return step
