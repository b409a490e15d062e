"""How one rollout is cut into optimizer steps, and where PPO's old log-probs come from.

The update runs `ppo_epochs` passes over the kept responses; each pass shuffles them into
mini-batches (one optimizer step each) of micro-batches (one forward/backward each, gradients
accumulated). Every rank runs the same number of micro-batches (a rank with fewer rows runs
empty ones), since each backward is a collective under DDP and FSDP2.

PPO's ratio compares the training forward with the policy that sampled: "old" log-probs must
come from the same weights, dtype and code path as the training forward, or the ratio of an
on-policy step is not 1. With a single optimizer step per rollout (one epoch, one mini-batch)
they are the detached log-probs of the training forward itself; otherwise one no-grad pass
through the training path, over the first epoch's very micro-batches, computes them before the
first step. KL in the reward needs them before the advantages, so it asks for that pass too;
with one optimizer step and `model.hold_graphs`, the step's training forward runs ahead
instead and its graphs are held until the backward (one forward fewer, the activations of
every micro-batch held at once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class UpdatePlan:
    """`epochs[e][m]` lists the micro-batches (row indices, possibly empty) of mini-batch m
    of epoch e. `old_logprobs` / `ref_logprobs` [R, G] hold the training-path log-probs of
    the kept rows when computed ahead (zero elsewhere); None otherwise. `held[i]`, when the
    only step's forward ran ahead, is micro-batch i's log-probs with their graph."""

    keep: Tensor
    epochs: list[list[list[Tensor]]] = field(default_factory=list)
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    held: list[Tensor] | None = None

    @property
    def optimizer_steps(self) -> int:
        return sum(len(epoch) for epoch in self.epochs)

    @property
    def first_micro_batches(self) -> list[Tensor]:
        return [part for mini in self.epochs[0] for part in mini] if self.epochs else []


def plan_epochs(
    rows: Tensor,
    most_rows: int,
    ppo_epochs: int,
    mini_batch_size: int | None,
    micro_batch_size: int,
    steps_left: int,
) -> list[list[list[Tensor]]]:
    """Shuffled epochs of mini-batches of micro-batches over `rows` (this rank's kept rows).

    `most_rows` is the largest row count of any rank: it fixes the number of mini- and
    micro-batches everywhere. At most `steps_left` optimizer steps are planned in all, so a
    run stops at exactly `trainer.max_steps`. Shuffles draw from torch's global generator.
    """
    if most_rows == 0 or steps_left <= 0:
        return []
    mini = mini_batch_size or most_rows
    n_mini = math.ceil(most_rows / mini)
    n_micro = math.ceil(min(mini, most_rows) / micro_batch_size)
    epochs = []
    for _ in range(ppo_epochs):
        order = rows[torch.randperm(len(rows), device=rows.device)]
        minis = []
        for m in range(n_mini):
            chunk = order[m * mini : (m + 1) * mini]
            minis.append(
                [chunk[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(n_micro)]
            )
        epochs.append(minis[:steps_left])
        steps_left -= len(epochs[-1])
        if steps_left <= 0:
            break
    return epochs


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a step counter that went from `before` to `after` passed a multiple of `every`
    (one in (before, after]): several optimizer steps a rollout, or none, skip or repeat
    values, so landing on a multiple is not enough."""
    return after // every > before // every


def old_logprobs_source(
    plan: UpdatePlan, kl_in_reward: bool, has_reference: bool, hold_graphs: bool
) -> str:
    """Where PPO's old log-probs come from: "forward" (the training forward itself, detached:
    one optimizer step and nothing needs them before it), "held" (that forward run ahead,
    its graphs held: one step, KL in the reward, `hold_graphs`) or "pass" (a no-grad pass)."""
    if plan.optimizer_steps > 1:
        return "pass"
    if not (kl_in_reward and has_reference):
        return "forward"
    return "held" if hold_graphs else "pass"
