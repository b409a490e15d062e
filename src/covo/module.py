"""The LightningModule: rollout -> reward -> advantages -> policy-gradient update."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import hydra
import lightning.pytorch as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig
from torchmetrics import MaxMetric, MeanMetric

from covo.algorithms.advantages import filter_groups
from covo.algorithms.losses import (
    kl_estimate,
    kl_loss,
    loss_count,
    loss_weights,
    masked_mean,
    policy_loss,
)
from covo.algorithms.update import UpdatePlan, crossed, old_logprobs_source, plan_epochs
from covo.analysis.plots import distance_curve_figure, figure_to_array
from covo.answers import AnswerEquivalence, get_extractor
from covo.infra import distributed as dist
from covo.infra.errors import DataError
from covo.infra.resume import all_rng_states, set_rng_state
from covo.infra.settings import PRECISION_COMPUTE
from covo.metrics.diagnostics import consistency_volatility_values, distance_curves
from covo.metrics.step import reward_metrics, rollout_metrics, sample_table
from covo.models import lora
from covo.models.loading import LoadedModel, torch_dtype
from covo.rewards.base import GroupReward, Reward, label_for
from covo.rewards.covo.scorer import PrefixSharedScorer
from covo.rollout.sampling import (
    Rollout,
    build_rollout,
    eos_token_ids,
    format_prompts,
    response_mask_from,
    response_token_stats,
    sample,
)
from covo.rollout.views import sample_views, training_rows

log = logging.getLogger(__name__)


def hold_unregistered(module: torch.nn.Module, name: str, value) -> None:
    """An attribute that is not a submodule: no strategy wraps, shards, casts or checkpoints
    it (the frozen reference, the rollout replica used for validation)."""
    object.__setattr__(module, name, value)


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


@dataclass
class Scored:
    rewards: torch.Tensor
    results: list[GroupReward]
    labels: list[str | None]  # diagnostics only


class SelfRewardRL(L.LightningModule):
    """Self-rewarding RL of a causal LM.

    `reward` maps a prompt's group of responses to rewards; `algorithm` holds the advantage
    estimator (a partial), KL, clipping and batching settings; `optimizer` and `scheduler`
    are partials completed here. Validation reads answers with the extractor `val_extractor`
    names (`covo.answers.EXTRACTORS`).
    """

    def __init__(
        self,
        model: LoadedModel,
        reward: Reward,
        algorithm: DictConfig,
        optimizer,
        scheduler,
        rollout: DictConfig,
        val_extractor: str,
        max_grad_norm: float = 1.0,
        scoring_dtype: str | None = None,
        reuse_rollout_cache: bool = True,
        samples_every_n_steps: int = 10,
        plots_every_n_steps: int = 10,
        threads: int | None = None,
        reference_dtype: str | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.policy = model.model.train()
        self.tokenizer = model.tokenizer
        self.chat_template = model.chat_template
        self.hold_graphs = model.hold_graphs
        self.reward = reward
        self.algorithm = algorithm
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.rollout_cfg = rollout
        self.engine = hydra.utils.instantiate(rollout.engine)
        self.idle_rollouts = 0  # rollouts in a row without an optimizer step
        self.max_grad_norm = max_grad_norm
        self.scoring_dtype = torch_dtype(scoring_dtype)
        self.samples_every_n_steps = samples_every_n_steps
        self.plots_every_n_steps = plots_every_n_steps
        self.media_step = -1  # the step of the last rollout that considered media
        self.val_extractor = val_extractor
        self.val_extract = get_extractor(val_extractor)
        self.threads = threads
        rollout_dtype = torch_dtype(rollout.dtype)
        reference = None
        if algorithm.kl_coef > 0:
            reference = lora.reference_of(self.policy, torch_dtype(reference_dtype))
        hold_unregistered(self, "reference", reference)
        # under LoRA checkpoints hold the adapters only (`state_dict`)
        self.strict_loading = not lora.is_lora(self.policy)
        self.rollout_view = dist.InferenceView(rollout_dtype)
        self.scoring_view = (
            dist.InferenceView(self.scoring_dtype)
            if self.scoring_dtype not in (None, rollout_dtype)
            else self.rollout_view
        )
        # the scorer reads each trajectory's keys and values from the rollout's log-prob
        # forward: only valid when both run on the same weights in the same dtype
        self.keep_rollout_cache = (
            reuse_rollout_cache
            and getattr(reward, "uses_scorer", False)
            and self.scoring_view is self.rollout_view
        )
        self.equivalence = AnswerEquivalence()
        self.val_accuracy = MeanMetric()  # summed and counted over every rank's prompts
        self.val_accuracy_best = MaxMetric()

    def setup(self, stage: str) -> None:
        cores = len(os.sched_getaffinity(0))
        per_node = max(1, getattr(self.trainer, "num_devices", 1))
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads or max(1, cores // per_node))

    def on_fit_start(self) -> None:
        if self.global_rank == 0:
            log.info("val/accuracy reads answers with val_extractor=%s", self.val_extractor)
        if self.reference is not None:
            self.reference.to(self.device)

    def configure_model(self) -> None:
        """FSDP2: shard the policy (a copied reference stays whole on every process: its
        forwards then need no collectives; under LoRA the reference is the sharded policy)."""
        if isinstance(self.trainer.strategy, ModelParallelStrategy) and not dist.is_sharded(
            self.policy
        ):
            compute = PRECISION_COMPUTE.get(str(self.trainer.precision))
            compute = None if compute == "float32" else torch_dtype(compute)
            dist.shard(self.policy, self.device_mesh["data_parallel"], compute)

    def state_dict(self, *args, **kwargs) -> dict:
        state = super().state_dict(*args, **kwargs)
        return lora.adapter_state(self, state) if lora.is_lora(self.policy) else state

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = all_rng_states()  # every rank's, for an exact resume

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # FSDP2's checkpoint folder holds no state dict here: the strategy has already loaded
        # the weights, and refuses a folder that lacks any
        state = checkpoint.get("state_dict")
        missing = [k for k in self.state_dict() if state is not None and k not in state]
        if missing:
            raise DataError(
                f"ckpt_path: the checkpoint lacks {len(missing)} of the policy's"
                f" {len(self.state_dict())} weights (first: {missing[0]})"
            )
        states = checkpoint.get("rng_states")
        if states is not None and len(states) == self.trainer.world_size:
            set_rng_state(states[self.global_rank])

    def configure_optimizers(self):
        trained = [p for p in self.policy.parameters() if p.requires_grad]  # LoRA: adapters
        optimizer = self.optimizer_factory(params=trained)
        # the schedule's length is the run's, in optimizer steps (checked >= 1 up front)
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler}}

    def training_step(self, batch: dict, batch_idx: int) -> None:
        self.step_at_rollout = self.global_step
        rollout = self.rollout(batch["prompt"])
        scored = self.score(rollout, batch["answer"])
        start = time.perf_counter()
        trained, rewards = training_rows(  # the original view's rows, and others' if trained
            rollout, scored.rewards, scored.results, self.reward, self.tokenizer.pad_token_id
        )
        plan = self.plan_update(trained, rewards)
        advantages = self.advantages(trained, rewards, plan)
        update = self.update(trained, advantages, plan)
        self.timings["time/update_s"] = time.perf_counter() - start
        self.log_step(rollout, trained, scored, plan, update)
        self.stop_when_idle(plan)

    def on_train_start(self) -> None:
        self.media_step = self.global_step - 1  # a resumed run's first rollout may be due

    def stop_when_idle(self, plan: UpdatePlan) -> None:
        """Stop cleanly after `algorithm.max_idle_rollouts` rollouts in a row without an
        optimizer step (every group filtered away: the run would never reach max_steps)."""
        self.idle_rollouts = 0 if plan.epochs else self.idle_rollouts + 1
        limit = self.algorithm.max_idle_rollouts
        if limit and self.idle_rollouts >= limit:
            log.warning(
                "stopping at step %d of %d: %d rollouts in a row made no optimizer step (every"
                " group was filtered by algorithm.filter; set algorithm.filter.drop_all_zero=false"
                " or pick a reward this model can earn)",
                self.global_step,
                self.trainer.max_steps,
                self.idle_rollouts,
            )
            self.trainer.should_stop = True

    def rollout(self, prompts: list[str]) -> Rollout:
        start = time.perf_counter()
        model = self.rollout_view(self.policy)
        model.eval()
        rollout = self.sample(model, prompts)
        rollout.views = sample_views(self.reward, prompts, lambda texts: self.sample(model, texts))
        self.timings = {"time/rollout_s": time.perf_counter() - start}
        return rollout

    def sample(self, model, prompts: list[str]) -> Rollout:
        cfg = self.rollout_cfg
        return build_rollout(
            model,
            self.tokenizer,
            format_prompts(self.tokenizer, prompts, self.chat_template),
            num_samples=cfg.num_samples,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            stats_chunk=cfg.stats_chunk,
            keep_cache=self.keep_rollout_cache,
            engine=self.engine,
            one_pass=cfg.one_pass,
        )

    def score(self, rollout: Rollout, labels: list[str | None]) -> Scored:
        start = time.perf_counter()
        # the rollout view already holds this step's weights: no second refresh
        view = self.scoring_view
        model = view.replica if view is self.rollout_view and view.replica else view(self.policy)
        scorer = PrefixSharedScorer(model, self.tokenizer)
        step, rank = self.trainer.fit_loop.epoch_loop.total_batch_idx, self.global_rank
        truths = [label_for(self.reward, label) for label in labels]
        results = [self.reward(group, scorer) for group in rollout.groups(truths, step, rank)]
        rollout.context_caches = None  # free the keys and values before the update
        rewards = torch.tensor([r for res in results for r in res.rewards], dtype=torch.float32)
        elapsed = time.perf_counter() - start
        self.timings["time/reward_s"] = elapsed
        self.scoring_counts = {
            "perf/scoring_tokens": float(scorer.tokens_processed),
            "perf/scoring_floor_tokens": float(scorer.floor_tokens),
            "perf/scoring_reused_tokens": float(scorer.reused_tokens),
        }
        if scorer.tokens_processed:
            self.timings["time/scoring_s"] = elapsed
        return Scored(rewards.to(self.device), results, labels)

    def plan_update(self, rollout: Rollout, rewards: torch.Tensor) -> UpdatePlan:
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
            steps_left=self.trainer.max_steps - self.global_step,
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
                self.rollout_cfg.temperature,
                with_distribution_stats=False,
            )["logprobs"]

    def update(self, rollout: Rollout, advantages: torch.Tensor, plan: UpdatePlan) -> dict:
        """The planned optimizer steps; the schedule advances once after each.

        Every rank runs the same number of backward passes (gradients are all-reduced in each);
        a rank with fewer kept responses runs zero-weighted passes. Each step's loss is
        `algorithm.loss_agg` over its mini-batch (`covo.algorithms.losses`); statistics are token
        means over every micro-batch of every epoch.
        """
        if not plan.epochs:
            return {}
        algo, loss_mask = self.algorithm, self.loss_mask(rollout)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        self.policy.train()
        sums = dict.fromkeys(("clip_frac", "ratio_mean", "approx_kl", "kl"), 0.0)
        tokens, losses, grad_norms = 0.0, [], []
        held = iter(plan.held or [])
        for epoch in plan.epochs:
            for mini in epoch:
                count = loss_count(loss_mask[torch.cat(mini)], algo.loss_agg).reshape(1).double()
                # a mini-batch with nothing in the loss divides by 1: zero loss, zero gradient
                normalizer = max(dist.all_reduce_sum(count).item(), 1.0) / dist.world_size()
                for part in mini:
                    loss, stats, n = self.micro_batch_loss(
                        rollout, loss_mask, advantages, part, normalizer, plan, next(held, None)
                    )
                    self.manual_backward(loss)
                    losses.append(loss.item())
                    tokens += n
                    for key, value in stats.items():
                        sums[key] += value * n
                self.last_lr = optimizer.param_groups[0]["lr"]
                optimizer.step()  # clips first (`on_before_optimizer_step`)
                grad_norms.append(self.last_grad_norm)
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
        n_mini = plan.optimizer_steps
        metrics = {
            "train/loss": sum(losses) / n_mini,
            "train/grad_norm": sum(grad_norms) / n_mini,
            "train/optimizer_steps": float(n_mini),
        }
        for key in ("clip_frac", "ratio_mean", "approx_kl"):
            metrics[f"train/{key}"] = sums[key] / max(tokens, 1.0)
        if self.reference is not None and plan.old_logprobs is None:
            metrics["train/kl"] = sums["kl"] / max(tokens, 1.0)
        return metrics

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip the accumulated gradients and keep their norm. Lightning calls this inside the
        optimizer step, after a 16-mixed GradScaler has unscaled them (once per step): clipping
        after `manual_backward` would see gradients scaled by ~65,536."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        self.last_grad_norm = float(grad_norm)

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
        token count; `logprobs`, when the forward ran ahead, are its output. An empty part
        gives a zero loss that still touches every parameter (so collective backward passes
        stay matched)."""
        algo = self.algorithm
        empty = len(part) == 0
        rows = self.rows_of(part)
        mask = loss_mask[rows] * (0.0 if empty else 1.0)
        weights = loss_weights(mask, algo.loss_agg, self.rollout_cfg.max_new_tokens)
        if logprobs is None:
            logprobs = self.token_logprobs(self.policy, rollout, rows)
        # one optimizer step per rollout: this very forward is the policy that sampled
        old = logprobs.detach() if plan.old_logprobs is None else plan.old_logprobs[rows]
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
        return loss, {k: float(v) for k, v in stats.items()}, float(mask.sum())

    def log_step(
        self, rollout: Rollout, trained: Rollout, scored: Scored, plan: UpdatePlan, update: dict
    ) -> None:
        """Metrics of the step; `trained` holds the rows the update saw (the rollout's, plus
        other views' when the reward trains on them)."""
        metrics = {
            **rollout_metrics(trained, plan.keep),
            **reward_metrics(scored.results, scored.rewards, scored.labels, self.equivalence),
            **update,
            **self.timings,
            **self.scoring_counts,
        }
        if update:
            metrics["train/lr"] = self.last_lr  # the last optimizer step's
        if plan.old_logprobs is not None and plan.ref_logprobs is not None:
            mask = trained.response_mask * plan.keep[:, None]
            metrics["train/kl"] = float(masked_mean(plan.old_logprobs - plan.ref_logprobs, mask))
        tokens = float(trained.response_mask.sum())
        step_time = sum(v for k, v in self.timings.items() if k != "time/scoring_s")
        metrics["perf/tokens_per_s"] = tokens / max(step_time, 1e-9)
        self.log_rollout(dist.mean_across_ranks(metrics), shown=("reward/mean", "diag/accuracy"))
        if self.global_rank == 0:
            self.log_media(rollout, scored)

    def log_rollout(self, metrics: dict[str, float], shown=()) -> None:
        """This rollout's values, at the optimizer step it began at, for callbacks (and the
        progress bar) and for the loggers. Lightning's logger would write them at its count of
        batches (rollouts), and write a filtered rollout's missing `train/` values again."""
        for name, value in metrics.items():
            self.log(name, value, on_step=True, batch_size=1, logger=False, prog_bar=name in shown)
        for logger in self.loggers:  # each writes on rank 0 only
            logger.log_metrics(metrics, step=self.step_at_rollout)
            logger.save()

    def log_media(self, rollout: Rollout, scored: Scored) -> None:
        """Samples as text, reward-component histograms, the distance-curve figure."""
        board = getattr(self.logger, "experiment", None)
        if not hasattr(board, "add_text"):
            return
        step, results, labels = self.step_at_rollout, scored.results, scored.labels
        before, self.media_step = self.media_step, step
        if crossed(before, step, self.samples_every_n_steps):
            board.add_text("samples", sample_table(rollout, results, labels), step)
        if not crossed(before, step, self.plots_every_n_steps) or any(
            label is None for label in labels
        ):
            return
        for name, values in consistency_volatility_values(
            results, labels, self.equivalence
        ).items():
            board.add_histogram(f"diag/{name}", torch.tensor(values), step)
        curves = distance_curves(results, labels, self.equivalence)
        if curves["correct_trajectories"] + curves["incorrect_trajectories"] > 0:
            image = figure_to_array(distance_curve_figure(curves))
            board.add_image("diag/distance_curves", image, step, dataformats="HWC")

    def on_validation_epoch_start(self) -> None:
        # weights fixed until the end
        hold_unregistered(self, "validation_model", self.rollout_view(self.policy))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Greedy pass@1 on the validation split."""
        model = self.validation_model
        prompts = format_prompts(self.tokenizer, batch["prompt"], self.chat_template)
        responses = sample(
            model,
            self.tokenizer,
            prompts,
            1,
            self.rollout_cfg.max_new_tokens,
            temperature=0.0,
            with_stats=False,
        ).responses
        eos = eos_token_ids(model, self.tokenizer)
        mask = response_mask_from(responses, eos)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        correct = self.grade(texts, batch["answer"])
        size = len(correct)
        # Lightning's logger writes a logged `step` as the x axis (else its batch count): the
        # optimizer step of the weights measured
        self.log("step", float(self.global_step), batch_size=size, sync_dist=True)
        self.val_accuracy.update(torch.tensor(correct, device=self.device))
        self.log("val/accuracy", self.val_accuracy, on_epoch=True, batch_size=size)
        self.log("val/len_mean", float(mask.sum(1).mean()), batch_size=size, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.val_accuracy_best.update(self.val_accuracy.compute())
        self.log("val/accuracy_best", self.val_accuracy_best.compute(), batch_size=1)

    def grade(self, texts: list[str], labels: list[str]) -> list[float]:
        """1.0 for each response whose answer, as `val_extractor` reads it, matches its label."""
        return [
            float(self.equivalence.is_correct(self.val_extract(text), label))
            for text, label in zip(texts, labels)
        ]
