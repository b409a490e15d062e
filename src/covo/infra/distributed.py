"""The few collectives the training loop needs, and strategy-specific access to the weights."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from covo.models.lora import base_of


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def collective_device() -> torch.device:
    """Where tensors handed to a collective must live: this process's GPU under NCCL."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(value: int) -> int:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.long, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_objects(value) -> list:
    """`value` from every rank, in rank order ([value] in a single process)."""
    if not is_distributed():
        return [value]
    every = [None] * world_size()
    dist.all_gather_object(every, value)
    return every


def mean_across_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the ranks that report it.

    Ranks may report different names (a diagnostic is only defined for some batches), so
    the names are agreed first and the values then reduced in one collective: per-name
    collectives would pair up different metrics on different ranks.
    """
    if not is_distributed():
        return metrics
    names = sorted(set().union(*all_gather_objects(sorted(metrics))))
    sums = torch.tensor(
        [[metrics[n], 1.0] if n in metrics else [0.0, 0.0] for n in names],
        dtype=torch.float64,
        device=collective_device(),
    )
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return {n: float(total / count) for n, (total, count) in zip(names, sums.tolist()) if count}


def is_sharded(model: nn.Module) -> bool:
    """True when parameters are FSDP2 DTensors (each forward is then a collective)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def shard(policy: nn.Module, mesh, compute_dtype: torch.dtype | None = None) -> None:
    """FSDP2 over `mesh`: each decoder layer and the root. The sharded parameters, their
    gradients and the optimizer state keep the policy's (fp32 master) dtype; forwards gather
    the parameters in `compute_dtype` (None: as they are); gradients reduce in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in base_of(policy).model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(policy, mesh=mesh, mp_policy=mp_policy)


@contextlib.contextmanager
def local_gradients(ddp: nn.Module | None, policy: nn.Module, sharded_too: bool = False):
    """Backward passes inside accumulate gradients on this process without reducing them; the
    first backward after the block reduces the sum (one all-reduce per bucket for the whole
    accumulation). `ddp` is the DistributedDataParallel wrapper, if any. FSDP2 (`policy`
    sharded) keeps its reduce-scatter per backward unless `sharded_too`: holding unreduced
    gradients there means the whole model's gradients in fp32 on every process."""
    if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        with ddp.no_sync():
            yield
    elif sharded_too and is_sharded(policy):
        policy.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            policy.set_requires_gradient_sync(True)
    else:
        yield


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, on every rank (all-gathers sharded parameters)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def whole(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One weight whole on this rank: a sharded one all-gathered, its shard cast to `dtype`
    first (None: as it is) so the gather moves and holds the replica's bytes, not fp32's."""
    if type(tensor).__name__ != "DTensor":
        return tensor
    return (tensor if dtype is None else tensor.to(dtype)).full_tensor()


def local_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters())
    return (
        parameter.to_local().device if type(parameter).__name__ == "DTensor" else parameter.device
    )
