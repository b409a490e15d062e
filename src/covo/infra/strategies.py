"""Hardware strategies: `strategy=auto|ddp|fsdp`."""

from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy, SingleDeviceStrategy, Strategy


def single_device(accelerator: str = "cpu") -> Strategy:
    return SingleDeviceStrategy(device="cuda:0" if accelerator in ("gpu", "cuda") else "cpu")


def fsdp(devices: int = 2, num_nodes: int = 1) -> Strategy:
    """FSDP2 on every accelerator: `fully_shard` per decoder layer in `configure_model`, through
    ModelParallelStrategy (Lightning's FSDPStrategy wraps the whole LightningModule with FSDP1
    and refuses the CPU). One code path, so what runs on CPU runs on GPUs."""
    return ModelParallelStrategy(data_parallel_size=devices * num_nodes, tensor_parallel_size=1)
