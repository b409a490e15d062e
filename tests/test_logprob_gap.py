"""`rollout/logprob_gap_*` over every rank's tokens, in two real gloo processes."""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from covo.metrics.gap import gap_sums, logprob_gap


def gap_of(sampled, policy, mask) -> dict:
    return logprob_gap(**{k: float(v) for k, v in gap_sums(sampled, policy, mask).items()})


# rank 0: gaps 0.5 and 0.25 (a third token masked out); rank 1: one gap of 2.0, one masked
SAMPLED = [torch.tensor([[-1.0, -2.0, -9.0]]), torch.tensor([[-4.0, -1.0, 0.0]])]
POLICY = [torch.tensor([[-1.5, -2.25, 0.0]]), torch.tensor([[-2.0, -3.0, 0.0]])]
MASK = [torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])]


def _worker(rank: int, init_file: str, results) -> None:
    torch_dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    try:
        results[rank] = gap_of(SAMPLED[rank], POLICY[rank], MASK[rank])
    finally:
        torch_dist.destroy_process_group()


def test_the_gap_is_the_max_and_token_mean_over_every_rank(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "init"), results), nprocs=2)
        results = dict(results)
    # max of 0.5, 0.25, 2.0; mean (0.5 + 0.25 + 2.0) / 3 tokens, not a mean of rank means
    for rank in (0, 1):
        assert results[rank]["rollout/logprob_gap_max"] == 2.0
        assert abs(results[rank]["rollout/logprob_gap_mean"] - 2.75 / 3) < 1e-7


def test_no_tokens_no_gap():
    assert gap_of(torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2)) == {}
