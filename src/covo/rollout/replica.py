"""The policy as rollout and scoring see it: itself, or a replica refreshed from it."""

from __future__ import annotations

import torch
from torch import nn

from covo.infra.distributed import is_sharded, local_device, whole
from covo.models.loading import copy_weights, empty_copy
from covo.models.lora import base_of, is_lora, merged_entries


class InferenceView:
    """The policy as rollout and scoring see it.

    With no `dtype` (or the policy's own) and unsharded weights, the policy itself (under LoRA
    the Hugging Face model with its adapters active). Otherwise a local replica, refreshed from
    the policy before each use: in `dtype` (bf16 decoding would otherwise re-cast fp32 master
    weights at every token), and whole when the policy is sharded (FSDP2), so generation and
    scoring run rank-local, with no collective per step. A LoRA policy's replica is the plain
    model with the adapters merged into its weights.

    The replica is allocated once, in `dtype`, and refreshed one weight at a time: beyond it a
    refresh holds one weight whole (in `dtype`; under LoRA an adapted weight in the master dtype
    and its merge), never the whole policy (docs/precision.md, "Memory of the replica and the
    reference").
    """

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype
        self.replica: nn.Module | None = None

    def needs_replica(self, policy: nn.Module) -> bool:
        own_dtype = self.dtype is None or self.dtype == next(policy.parameters()).dtype
        return is_sharded(policy) or not own_dtype

    def __call__(self, policy: nn.Module) -> nn.Module:
        if not self.needs_replica(policy):
            return base_of(policy)
        if self.replica is None:
            self.replica = empty_copy(base_of(policy), self.dtype, local_device(policy))
        # under LoRA the merge reads the master weight: the copy casts the merged one
        dtype = None if is_lora(policy) else self.dtype
        copy_weights(
            self.replica, merged_entries(policy, policy.state_dict(), lambda t: whole(t, dtype))
        )
        return self.replica
