"""The few collectives the training loop needs, and strategy-specific access to the weights."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(value: int) -> int:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def is_sharded(model: nn.Module) -> bool:
    """True when parameters are FSDP2 DTensors (each forward is then a collective)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, on every rank (all-gathers sharded parameters)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


class InferenceView:
    """The policy as rollout and scoring see it.

    Unsharded models are used as they are. Sharded (FSDP2) policies are copied, whole, into a
    local replica refreshed before each rollout: generation and scoring then run rank-local,
    with no collective per decoding step, so ranks can finish at different times.
    """

    def __init__(self) -> None:
        self.replica: nn.Module | None = None

    def __call__(self, policy: nn.Module) -> nn.Module:
        if not is_sharded(policy):
            return policy
        state = {k: v.detach() for k, v in full_state_dict(policy).items()}
        if self.replica is None:
            self.replica = copy.deepcopy(unsharded_skeleton(policy, state))
        self.replica.load_state_dict(state)
        return self.replica


def unsharded_skeleton(policy: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain module of the policy's class and config, holding `state`."""
    replica = type(policy)(policy.config)
    replica.load_state_dict(state)
    replica.generation_config = policy.generation_config
    return replica.to(next(iter(state.values())).device).eval()
