"""Hardware strategies: `strategy=auto|ddp|fsdp`."""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import (
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)


def single_device(accelerator: str = "cpu") -> Strategy:
    return SingleDeviceStrategy(device="cuda:0" if accelerator in ("gpu", "cuda") else "cpu")


def fsdp(accelerator: str = "cpu", devices: int = 2, num_nodes: int = 1) -> Strategy:
    """Lightning's FSDP on GPUs; FSDP2 (`fully_shard` in `configure_model`) elsewhere, since
    Lightning's FSDPStrategy refuses the CPU."""
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, state_dict_type="full")
    return ModelParallelStrategy(data_parallel_size=devices * num_nodes, tensor_parallel_size=1)
