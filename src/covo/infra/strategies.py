"""Hardware strategies: `strategy=auto|ddp|fsdp`."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.strategies import ModelParallelStrategy, SingleDeviceStrategy, Strategy

from covo.infra.resume import partial_path, remove_path, replace_checkpoint


def single_device(accelerator: str = "cpu") -> Strategy:
    return SingleDeviceStrategy(device="cuda:0" if accelerator in ("gpu", "cuda") else "cpu")


class FullyShardedStrategy(ModelParallelStrategy):
    """FSDP2 over every process.

    `accumulate_unsharded`: micro-batches of a step keep their gradients unreduced until the
    last one (one reduce-scatter a step instead of one per micro-batch), at the cost of the
    whole model's gradients in fp32 on every process (4 bytes a parameter: 28 GB at 7B).

    Sharded (folder) checkpoints are written whole or not at all: every rank writes its shards
    into a temporary folder beside the target, which replaces the target once all are written
    (`covo.infra.resume.replace_checkpoint`). Lightning writes them in place and bypasses the
    trainer's checkpoint IO: a kill mid-save could leave a `last.ckpt` of old and new shards."""

    def __init__(self, data_parallel_size: int, accumulate_unsharded: bool = False) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1)
        self.accumulate_unsharded = accumulate_unsharded

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))
        written = partial_path(path)
        if self.is_global_zero:
            remove_path(written)  # left by a save that was killed
        self.barrier("checkpoint_start")
        super().save_checkpoint(checkpoint, written, storage_options)
        self.barrier("checkpoint_written")
        if self.is_global_zero:
            replace_checkpoint(written, path)
        self.barrier("checkpoint_in_place")


def fsdp(devices: int = 2, num_nodes: int = 1, accumulate_unsharded: bool = False) -> Strategy:
    """FSDP2 on every accelerator: `fully_shard` per decoder layer in `configure_model`, through
    ModelParallelStrategy (Lightning's FSDPStrategy wraps the whole LightningModule with FSDP1
    and refuses the CPU). One code path, so what runs on CPU runs on GPUs."""
    return FullyShardedStrategy(devices * num_nodes, accumulate_unsharded)
