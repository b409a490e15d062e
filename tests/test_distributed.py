"""The training loop's collectives, in two real gloo processes."""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from covo.infra import distributed as dist
from covo.rollout.replica import InferenceView

METRICS = [{"a": 1.0, "b": 2.0}, {"a": 3.0, "c": 5.0}]


def _worker(rank: int, init_file: str, results) -> None:
    torch_dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    try:
        summed = dist.all_reduce_sum(torch.tensor([float(rank + 1)]))
        results[rank] = {
            "device": str(dist.collective_device()),
            "world": dist.world_size(),
            "max": dist.all_reduce_max(10 * rank + 7),
            "sum": summed.item(),
            "mean": dist.mean_across_ranks(METRICS[rank]),
        }
    finally:
        torch_dist.destroy_process_group()


def test_collectives_across_two_processes(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "init"), results), nprocs=2)
        results = dict(results)
    for rank in (0, 1):
        assert results[rank]["device"] == "cpu"
        assert results[rank]["world"] == 2
        assert results[rank]["max"] == 17
        assert results[rank]["sum"] == 3.0
        # each name averaged over the ranks that report it
        assert results[rank]["mean"] == {"a": 2.0, "b": 2.0, "c": 5.0}


def test_single_process_is_the_identity():
    assert not dist.is_distributed()
    assert dist.world_size() == 1
    assert dist.all_reduce_max(4) == 4
    assert dist.mean_across_ranks({"x": 1.5}) == {"x": 1.5}


def test_building_a_replica_draws_nothing_from_the_sampling_generator():
    from covo.models.loading import build_tiny

    policy = build_tiny().model
    state = torch.get_rng_state()
    InferenceView(torch.bfloat16)(policy)
    assert torch.equal(torch.get_rng_state(), state)
