"""A covo reward under sharded parameters (FSDP2, DeepSpeed ZeRO-3).

There every forward is a collective: each process's forward of a module waits for the
others' to gather its parameters. A covo reward scores each process's own groups with its own
number of forwards (other completion lengths, other answers for CoVo's scorer), so it runs on
the full parameters, gathered once per call on every process (`full_parameters`), as TRL
gathers them for generation. Around TRL's `generate` (transformers then keeps the processes
decoding in step, `synced_generation`), the capture's one completing forward runs on every
process.
"""

from __future__ import annotations

import contextlib

import torch


def fsdp2_modules(model: torch.nn.Module) -> list:
    """The modules of `model` that FSDP2 shards (`fully_shard`)."""
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def zero3(trainer) -> bool:
    """Whether the trainer's parameters are sharded by DeepSpeed ZeRO-3."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def synced_generation(model: torch.nn.Module) -> bool:
    """Whether `generate` keeps the processes decoding in step (transformers' `synced_gpus`):
    parameters sharded by FSDP or DeepSpeed ZeRO-3 over several processes."""
    from transformers.distributed.fsdp import is_fsdp_managed_module
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if distributed else 1
    return world > 1 and (is_deepspeed_zero3_enabled() or is_fsdp_managed_module(model))


@contextlib.contextmanager
def full_parameters(trainer, model: torch.nn.Module):
    """The block runs on the policy's full parameters on every process, gathered once: under
    FSDP2 each sharded module is unsharded and kept so through the block's forwards (none of
    them is a collective then, whatever their number on each process), resharded after; under
    DeepSpeed ZeRO-3 through TRL's own gathering for generation (`unwrap_model_for_generation`:
    `deepspeed.zero.GatheredParameters` over every parameter, ZeRO's forward hooks off,
    gradient checkpointing off and back on with the trainer's own settings). Costs the full
    parameters' memory on each process for the reward's time, as generation does. A no-op
    without sharding."""
    if zero3(trainer):
        from trl.models.utils import unwrap_model_for_generation

        with unwrap_model_for_generation(
            trainer.model_wrapped,
            trainer.accelerator,
            gather_deepspeed3_params=True,  # whatever ds3_gather_for_generation says
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
        ):
            yield
        return
    sharded = fsdp2_modules(model)
    if not sharded:
        yield
        return
    # each module's own reshard-after-forward setting, put back after (FSDP2 has no getter)
    resharding = [module._get_fsdp_state()._fsdp_param_group for module in sharded]
    resharding = [
        group is not None and group.post_forward_mesh_info is not None for group in resharding
    ]
    for module in sharded:
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for module, reshard in zip(sharded, resharding):
            module.reshard()
            module.set_reshard_after_forward(reshard, recurse=False)
