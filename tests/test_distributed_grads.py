"""Two gloo processes under DDP and FSDP2 produce the single-process gradient of the same batch.

Each rank takes half the rows, accumulates two micro-batches with the loop's normalizer (this
rank's share of the batch's count, tokens or sequences in the loss: all-reduced count / world
size), and the strategy averages across ranks: the result must be the loss aggregate over the
whole batch. Row 6 has no token in the loss, so the ranks hold 4 and 3 sequences.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from covo.algorithms.losses import loss_count, loss_weights, policy_loss
from covo.infra import distributed as dist
from covo.models.loading import build_tiny
from covo.rollout.sampling import response_token_stats

pytestmark = pytest.mark.slow
RESPONSE = 6


def batch():
    g = torch.Generator().manual_seed(0)
    sequences = torch.randint(5, 300, (8, 14), generator=g)
    attention = torch.ones_like(sequences)
    attention[:3, :2] = 0  # left padding
    response_mask = torch.ones(8, RESPONSE)
    response_mask[2, 4:] = 0  # ended early
    response_mask[5, 2:] = 0
    response_mask[6] = 0  # e.g. truncated, with algorithm.mask_truncated
    attention[:, -RESPONSE:] = response_mask.long()
    advantages = torch.randn(8, RESPONSE, generator=g) * response_mask
    return sequences, attention, response_mask, advantages


def grads_for(model, rows, micro: int, world: int, loss_agg: str) -> None:
    sequences, attention, mask, advantages = batch()
    count = loss_count(mask[rows], loss_agg).reshape(1).double()
    normalizer = max(dist.all_reduce_sum(count).item(), 1.0) / world
    for i in range(0, len(rows), micro):
        part = rows[i : i + micro]
        logp = response_token_stats(
            model, sequences[part], attention[part], RESPONSE, with_distribution_stats=False
        )["logprobs"]
        weights = loss_weights(mask[part], loss_agg, RESPONSE)
        loss, _ = policy_loss(
            logp, logp.detach(), advantages[part], mask[part], 0.2, normalizer, weights
        )
        loss.backward()


def full_grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name.replace("_fsdp_wrapped_module.", "")] = (
            g.full_tensor() if hasattr(g, "full_tensor") else g
        ).clone()
    return out


def _worker(rank, init_file, strategy, loss_agg, results):
    torch_dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    torch.set_num_threads(1)
    try:
        model = build_tiny(seed=0).model.train()
        if strategy == "ddp":
            # DDP averages the gradients in hooks set up by its own forward
            forward_model = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh

            compute = torch.bfloat16 if strategy == "fsdp_bf16" else None
            dist.shard(model, init_device_mesh("cpu", (2,)), compute)
            forward_model = model
        rows = torch.arange(rank * 4, rank * 4 + 4)
        grads_for(forward_model, rows, micro=2, world=2, loss_agg=loss_agg)
        grads = full_grads(model)
        dtypes = {str(p.dtype) for p in model.parameters()}
        if rank == 0:
            results["grads"] = grads
            results["dtypes"] = dtypes
    finally:
        torch_dist.destroy_process_group()
    # Freeing DDP's reducer frees the gloo group, whose destructor joins gloo's worker thread
    # while holding the GIL that thread may need to free its last work: seen to hang for good.
    # The results are with the manager already: leave without freeing anything.
    os._exit(0)


@pytest.mark.parametrize(
    ("strategy", "loss_agg"),
    [
        ("ddp", "token_mean"),
        ("fsdp", "token_mean"),
        ("fsdp_bf16", "token_mean"),
        ("ddp", "seq_mean_token_mean"),
        ("ddp", "seq_mean_token_sum_norm"),
    ],
)
def test_two_processes_give_the_single_process_gradient(strategy, loss_agg, tmp_path):
    torch.set_num_threads(1)
    model = build_tiny(seed=0).model.train()
    grads_for(model, torch.arange(8), micro=8, world=1, loss_agg=loss_agg)
    want = full_grads(model)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "init"), strategy, loss_agg, results), nprocs=2)
        got, dtypes = dict(results["grads"]), results["dtypes"]
    assert dtypes == {"torch.float32"}  # the master weights stay fp32, and so do their grads
    assert {g.dtype for g in got.values()} == {torch.float32}
    assert got.keys() == want.keys()
    for name in want:
        if strategy == "fsdp_bf16":  # bf16 forward and backward, fp32 reduce and master
            err = (got[name] - want[name]).norm() / want[name].norm()
            assert err < 0.05, (name, err)
        else:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)
    assert max(g.abs().max() for g in want.values()) > 1e-3
