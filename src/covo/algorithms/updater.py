"""The update engine: filtered groups -> planned micro-batches -> old/reference log-probs ->
advantages -> PPO-clip optimizer steps. The LightningModule calls it once per rollout."""

from __future__ import annotations

import contextlib

import torch
from omegaconf import DictConfig

from covo.algorithms.advantages import filter_groups
from covo.algorithms.losses import (
    LOSS_AGGREGATIONS,
    kl_estimate,
    kl_loss,
    loss_count,
    loss_weights,
    masked_mean,
    policy_loss,
)
from covo.algorithms.update import UpdatePlan, old_logprobs_source, plan_epochs
from covo.infra import distributed as dist
from covo.infra.checks import (
    BOOL,
    INT_GE1,
    Rule,
    above,
    apply_rules,
    apply_rules_where_set,
    at_least,
    between,
    choice,
    fail,
    one_of,
    optional,
)
from covo.metrics.gap import gap_sums, logprob_gap
from covo.rollout.sampling import Rollout, response_token_stats

ALGORITHM_RULES: list[Rule] = [
    ("mask_truncated", *BOOL),
    ("loss_agg", *choice(*LOSS_AGGREGATIONS)),
    ("max_idle_rollouts", optional(at_least(1, integer_only=True)), "null or an integer >= 1"),
    ("clip_eps", above(0.0), "a number > 0"),
    ("kl_coef", at_least(0.0), "a number >= 0"),
    ("kl_estimator", one_of("k1", "k2", "k3"), "k1, k2 or k3"),
    ("kl_in_reward", *BOOL),
    ("ppo_epochs", *INT_GE1),
    ("micro_batch_size", *INT_GE1),
    ("mini_batch_size", optional(at_least(1, integer_only=True)), "null or an integer >= 1"),
]
# knobs of some estimators only (`reinforce_pp`'s gamma, `grpo`'s eps): checked where set
ADVANTAGE_RULES: list[Rule] = [
    ("gamma", between(0.0, 1.0, low_open=True), "a number in (0, 1]"),
    ("eps", above(0.0), "a number > 0"),
]


def check_algorithm(algo: DictConfig, prefix: str = "algorithm.") -> None:
    """The `algorithm` group's settings, before any model work: every knob `Updater` reads,
    and the advantage estimator's own where its option has them."""
    apply_rules(algo, ALGORITHM_RULES, prefix)
    apply_rules_where_set(algo.advantage, ADVANTAGE_RULES, f"{prefix}advantage.")
    if algo.mini_batch_size is not None and algo.micro_batch_size > algo.mini_batch_size:
        fail(
            f"{prefix}micro_batch_size",
            algo.micro_batch_size,
            f"at most {prefix}mini_batch_size={algo.mini_batch_size}",
        )
    if not algo.kl_in_reward and algo.kl_estimator == "k1" and algo.kl_coef > 0:
        fail(
            f"{prefix}kl_estimator",
            "k1",
            f"k2 or k3 with {prefix}kl_in_reward=false (k1 in the loss has zero expected"
            " gradient: it regularises nothing)",
        )


@contextlib.contextmanager
def shared_weight_casts(device_type: str):
    """Under mixed-precision autocast, one low-precision copy of each weight for every forward
    in the block. Lightning's autocast caches no casts, so each held graph would keep a copy of
    its own (a whole bf16 model per micro-batch); the weights do not change inside the block,
    and the cache is cleared on leaving it, before any optimizer step. Each micro-batch's
    backward runs on its own, so weight gradients still sum in the weights' dtype."""
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    dtype = torch.get_autocast_dtype(device_type)
    try:
        with torch.autocast(device_type, dtype=dtype, cache_enabled=True):
            yield
    finally:
        torch.clear_autocast_cache()


class Updater:
    """The policy-gradient update of one rollout.

    `policy` is trained; `reference` (or None without KL) gives the reference log-probs;
    `algorithm` holds the advantage estimator (a partial), KL, clipping and batching settings;
    `temperature` is the rollout's (log-probs of the sampling distribution);
    `max_new_tokens` scales the `seq_mean_token_sum_norm` loss; `hold_graphs` lets the only
    optimizer step of a rollout keep its forwards' graphs from the old log-probs pass.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        reference: torch.nn.Module | None,
        algorithm: DictConfig,
        temperature: float,
        max_new_tokens: int,
        hold_graphs: bool,
        max_grad_norm: float,
    ):
        self.policy = policy
        self.reference = reference
        self.algorithm = algorithm
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.hold_graphs = hold_graphs
        self.max_grad_norm = max_grad_norm
        self.device = torch.device("cpu")  # the module's, set as it moves (`on_fit_start`)
        self.last_lr: float | None = None  # the last optimizer step's (train/lr)
        self.policy_logprobs: torch.Tensor | None = None  # this update's, before any step

    def plan(self, rollout: Rollout, rewards: torch.Tensor, steps_left: int) -> UpdatePlan:
        """Filter groups, cut the kept rows into optimizer steps, and compute the old and
        reference log-probs over the first epoch's micro-batches where they are needed."""
        algo = self.algorithm
        keep = filter_groups(rewards, rollout.group_size, **algo.filter)
        rows = keep.nonzero().squeeze(1)
        plan = UpdatePlan(keep=keep)
        plan.epochs = plan_epochs(
            rows,
            dist.all_reduce_max(len(rows)),
            algo.ppo_epochs,
            algo.mini_batch_size,
            algo.micro_batch_size,
            steps_left=steps_left,
        )
        if not plan.epochs:
            return plan
        self.policy.train()  # the mode of the training forward, for the old log-probs too
        source = old_logprobs_source(
            plan, algo.kl_in_reward, self.reference is not None, self.hold_graphs
        )
        if source == "held":
            plan.held, plan.old_logprobs = self.forward_ahead(rollout, plan)
        elif source == "pass":
            plan.old_logprobs = self.logprobs_pass(self.policy, rollout, plan)
        if self.reference is not None:
            plan.ref_logprobs = self.logprobs_pass(self.reference, rollout, plan)
        return plan

    def logprobs_pass(self, model, rollout: Rollout, plan: UpdatePlan) -> torch.Tensor:
        """No-grad training-path log-probs [R, G] of the kept rows, over the very
        micro-batches of the first epoch (so each row sees the same batch as in training)."""
        out = torch.zeros_like(rollout.response_mask)
        for part in plan.first_micro_batches:
            if len(part):
                out[part] = self.token_logprobs(model, rollout, part, no_grad=True)
            elif dist.is_sharded(model):  # each forward is a collective: keep ranks in step
                self.token_logprobs(model, rollout, slice(0, 1), no_grad=True)
        return out

    def forward_ahead(self, rollout: Rollout, plan: UpdatePlan):
        """The only optimizer step's training forwards, run before the advantages: each
        micro-batch's log-probs with its graph (for the backward), and their values as the
        old log-probs [R, G]."""
        held, old = [], torch.zeros_like(rollout.response_mask)
        with shared_weight_casts(self.device.type):
            for part in plan.first_micro_batches:
                held.append(self.token_logprobs(self.policy, rollout, self.rows_of(part)))
                if len(part):
                    old[part] = held[-1].detach()
        return held, old

    def rows_of(self, part: torch.Tensor) -> torch.Tensor:
        """The rows a micro-batch feeds: an empty one feeds row 0 at zero weight, so that
        every rank runs the same collective forwards and backwards."""
        return part if len(part) else torch.zeros(1, dtype=torch.long, device=self.device)

    def advantages(self, rollout: Rollout, rewards: torch.Tensor, plan: UpdatePlan):
        algo = self.algorithm
        mask, keep = rollout.response_mask, plan.keep
        advantages = torch.zeros_like(mask)
        if not plan.epochs:
            return advantages
        token_kl = None
        if algo.kl_in_reward and plan.ref_logprobs is not None:
            token_kl = kl_estimate(plan.old_logprobs, plan.ref_logprobs, algo.kl_estimator)
            token_kl = token_kl[keep] * mask[keep]
        advantages[keep] = algo.advantage(
            rewards[keep],
            mask[keep],
            rollout.group_size,
            token_kl=token_kl,
            kl_coef=algo.kl_coef,
            all_reduce=dist.all_reduce_sum,
        )
        return advantages

    def token_logprobs(self, model, rollout: Rollout, rows=None, no_grad=False) -> torch.Tensor:
        rows = slice(None) if rows is None else rows
        with torch.set_grad_enabled(not no_grad):
            return response_token_stats(
                model,
                rollout.sequences[rows],
                rollout.attention_mask[rows],
                rollout.response_mask.shape[1],
                self.temperature,
                with_distribution_stats=False,
            )["logprobs"]

    def update(
        self,
        rollout: Rollout,
        advantages: torch.Tensor,
        plan: UpdatePlan,
        optimizer,
        scheduler,
        backward,
        local_gradients=contextlib.nullcontext,
    ) -> dict:
        """The planned optimizer steps; the schedule advances once after each. `backward` is
        the module's `manual_backward`; `optimizer.step()` clips first (`clip_gradients`).
        `local_gradients()` is a block whose backward passes keep their gradients on this
        rank (`covo.infra.distributed.local_gradients`): all micro-batches of a step but the
        last run in it, so gradients are reduced across ranks once per optimizer step.

        Every rank runs the same number of backward passes (the last of each step is a
        collective); a rank with fewer kept responses runs zero-weighted passes. Each step's
        loss is `algorithm.loss_agg` over its mini-batch (`covo.algorithms.losses`); statistics
        are token means over every micro-batch of every epoch. Values stay on the device until
        the end: one read to the host per rollout, not one per micro-batch.
        """
        if not plan.epochs:
            return {}
        algo, loss_mask = self.algorithm, self.loss_mask(rollout)
        # the policy's log-probs of the sampled tokens before any step (`rollout/logprob_gap_*`)
        self.policy_logprobs = plan.old_logprobs
        if plan.old_logprobs is None:  # filled by the only step's forwards
            self.policy_logprobs = torch.zeros_like(rollout.response_mask)
        self.policy.train()
        sums = dict.fromkeys(("clip_frac", "ratio_mean", "approx_kl", "kl"), 0.0)
        tokens, losses, grad_norms = 0.0, [], []
        held = iter(plan.held or [])
        for epoch in plan.epochs:
            for mini in epoch:
                count = loss_count(loss_mask[torch.cat(mini)], algo.loss_agg).reshape(1).double()
                # a mini-batch with nothing in the loss divides by 1: zero loss, zero gradient
                total = dist.all_reduce_sum(count).clamp(min=1.0)
                normalizer = (total / dist.world_size()).to(self.device, torch.float32).squeeze(0)
                for i, part in enumerate(mini):
                    loss, stats, n = self.micro_batch_loss(
                        rollout, loss_mask, advantages, part, normalizer, plan, next(held, None)
                    )
                    last = i == len(mini) - 1
                    with contextlib.nullcontext() if last else local_gradients():
                        backward(loss)
                    losses.append(loss.detach())
                    tokens = tokens + n
                    for key, value in stats.items():
                        sums[key] = sums[key] + value * n
                self.last_lr = optimizer.param_groups[0]["lr"]
                optimizer.step()  # clips first (`on_before_optimizer_step`)
                grad_norms.append(self.last_grad_norm)
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
        n_mini = plan.optimizer_steps
        kept = rollout.response_mask * plan.keep.to(rollout.response_mask)[:, None]
        gap = gap_sums(rollout.logprobs, self.policy_logprobs, kept)
        read = self.to_host(
            {"loss": sum(losses), "grad_norm": sum(grad_norms), "tokens": tokens, **sums, **gap}
        )
        metrics = {
            "train/loss": read["loss"] / n_mini,
            "train/grad_norm": read["grad_norm"] / n_mini,
            "train/optimizer_steps": float(n_mini),
        }
        tokens = max(read["tokens"], 1.0)
        for key in ("clip_frac", "ratio_mean", "approx_kl"):
            metrics[f"train/{key}"] = read[key] / tokens
        if self.reference is not None and plan.old_logprobs is None:
            metrics["train/kl"] = read["kl"] / tokens
        metrics.update(logprob_gap(read["gap_max"], read["gap_sum"], read["gap_count"]))
        return metrics

    def to_host(self, values: dict) -> dict[str, float]:
        """Scalars (tensors or numbers) as floats, in one read from the device."""
        stacked = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values.values()]
        )
        return dict(zip(values, stacked.tolist()))

    def clip_gradients(self) -> None:
        """Clip the accumulated gradients to `max_grad_norm` and keep their norm."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        self.last_grad_norm = grad_norm.detach()  # read with the step's other values

    def loss_mask(self, rollout: Rollout) -> torch.Tensor:
        """The tokens [R, G] in the loss: every response token, or with
        `algorithm.mask_truncated` none of a response cut at max_new_tokens without an EOS."""
        mask = rollout.response_mask
        if not self.algorithm.mask_truncated:
            return mask
        return mask * (~rollout.truncated.to(mask.device))[:, None].to(mask.dtype)

    def micro_batch_loss(
        self, rollout, loss_mask, advantages, part, normalizer, plan: UpdatePlan, logprobs=None
    ):
        """Loss of rows `part` scaled for accumulation, its token-mean statistics, and its
        token count (tensors: no read to the host); `logprobs`, when the forward ran ahead,
        are its output. An empty part gives a zero loss that still touches every parameter
        (so collective backward passes stay matched)."""
        algo = self.algorithm
        empty = len(part) == 0
        rows = self.rows_of(part)
        mask = loss_mask[rows] * (0.0 if empty else 1.0)
        weights = loss_weights(mask, algo.loss_agg, self.max_new_tokens)
        if logprobs is None:
            logprobs = self.token_logprobs(self.policy, rollout, rows)
        # one optimizer step per rollout: this very forward is the policy that sampled
        old = logprobs.detach() if plan.old_logprobs is None else plan.old_logprobs[rows]
        if plan.old_logprobs is None and self.policy_logprobs is not None and not empty:
            self.policy_logprobs[part] = old
        loss, stats = policy_loss(
            logprobs, old, advantages[rows], mask, algo.clip_eps, normalizer, weights
        )
        if plan.ref_logprobs is not None:
            ref = plan.ref_logprobs[rows]
            stats["kl"] = masked_mean(old - ref, mask)
            if not algo.kl_in_reward:
                loss = loss + algo.kl_coef * kl_loss(
                    logprobs, ref, mask, algo.kl_estimator, normalizer, weights
                )
        if empty:
            return loss + 0.0 * logprobs.sum(), {}, 0.0
        return loss, stats, mask.sum()
