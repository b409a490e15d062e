"""The default run's check of distributed training: two gloo processes under DDP, then under
FSDP2, give the single-process gradient of the same batch (token_mean; one spawn for both).
The other loss aggregations and bf16 compute are in tests/test_distributed_grads.py (slow)."""

from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from test_distributed_grads import full_grads, grads_for

from covo.infra import distributed as dist
from covo.models.loading import build_tiny


def _worker(rank, init_file, results):
    torch_dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    torch.set_num_threads(1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        rows = torch.arange(rank * 4, rank * 4 + 4)  # this rank's half of the batch
        ddp_model = build_tiny(seed=0).model.train()
        ddp = torch.nn.parallel.DistributedDataParallel(ddp_model)
        grads_for(ddp, rows, micro=2, world=2, loss_agg="token_mean")
        fsdp_model = build_tiny(seed=0).model.train()
        dist.shard(fsdp_model, init_device_mesh("cpu", (2,)), None)
        grads_for(fsdp_model, rows, micro=2, world=2, loss_agg="token_mean")
        fsdp = full_grads(fsdp_model)  # gathers the shards: every rank takes part
        if rank == 0:
            results["ddp"] = full_grads(ddp_model)
            results["fsdp"] = fsdp
    finally:
        torch_dist.destroy_process_group()
    os._exit(0)  # see test_distributed_grads._worker: freeing DDP's gloo group can hang


def test_ddp_and_fsdp_give_the_single_process_gradient(tmp_path):
    torch.set_num_threads(1)
    model = build_tiny(seed=0).model.train()
    grads_for(model, torch.arange(8), micro=8, world=1, loss_agg="token_mean")
    want = full_grads(model)
    assert max(g.abs().max() for g in want.values()) > 1e-3
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "init"), results), nprocs=2)
        got = {strategy: dict(results[strategy]) for strategy in ("ddp", "fsdp")}
    for strategy, grads in got.items():
        assert grads.keys() == want.keys(), strategy
        for name in want:
            torch.testing.assert_close(
                grads[name], want[name], rtol=1e-4, atol=1e-7, msg=f"{strategy}: {name}"
            )
