"""The LightningModule: rollout -> reward -> advantages -> policy-gradient update -> log."""

from __future__ import annotations

import logging
import time

import lightning.pytorch as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig

from covo.algorithms.update import UpdatePlan
from covo.algorithms.updater import Updater
from covo.answers import AnswerEquivalence, get_extractor
from covo.eval.harness import greedy_responses
from covo.infra import distributed as dist
from covo.infra.hardware import set_threads
from covo.infra.resume import all_rng_states, restore
from covo.launch.settings import PRECISION_COMPUTE
from covo.metrics.loggers import media_boards
from covo.metrics.media import MediaWriter
from covo.metrics.step import step_metrics
from covo.models import lora
from covo.models.loading import LoadedModel, torch_dtype
from covo.rewards.base import Reward
from covo.rewards.scoring import Scored, score_rollout
from covo.rollout.sampler import RolloutSampler, own_precision
from covo.rollout.sampling import Rollout
from covo.rollout.views import training_rows

log = logging.getLogger(__name__)


def hold_unregistered(module: torch.nn.Module, name: str, value) -> None:
    """An attribute that is not a submodule: no strategy wraps, shards, casts or checkpoints
    it (the frozen reference, the rollout replica used for validation)."""
    object.__setattr__(module, name, value)


class SelfRewardRL(L.LightningModule):
    """Self-rewarding RL of a causal LM, built from `conf/train.yaml`'s `module` node.

    `reward` maps a prompt's group of responses to rewards; `algorithm` holds the advantage
    estimator (a partial), KL, clipping and batching settings; `optimizer` and `scheduler`
    are partials completed here; `rollout` holds the sampling settings and the built engine.
    Validation reads answers with the extractor `val_extractor` names (`covo.answers`).
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
        max_grad_norm: float,
        scoring_dtype: str | None,
        reuse_rollout_cache: bool,
        samples_every_n_steps: int,
        plots_every_n_steps: int,
        threads: int | None,
        reference_dtype: str | None,
    ):  # every default lives in conf/train.yaml's `module` node
        super().__init__()
        self.automatic_optimization = False
        self.policy = model.model.train()
        self.tokenizer = model.tokenizer
        self.chat_template = model.chat_template
        self.reward = reward
        self.algorithm = algorithm
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.max_new_tokens = rollout.max_new_tokens
        self.threads = threads
        self.val_extractor = val_extractor
        self.val_extract = get_extractor(val_extractor)
        self.sampler = RolloutSampler(self.tokenizer, self.chat_template, rollout)
        self.scoring_view = self.sampler.scoring_view(torch_dtype(scoring_dtype))
        # the scorer reads each trajectory's keys and values from the rollout's log-prob
        # forward: only valid when both run on the same weights in the same dtype
        self.sampler.keep_cache = (
            reuse_rollout_cache
            and getattr(reward, "uses_scorer", False)
            and self.scoring_view is self.sampler.view
        )
        reference = None
        if algorithm.kl_coef > 0:
            reference = lora.reference_of(self.policy, torch_dtype(reference_dtype))
        hold_unregistered(self, "reference", reference)
        self.updater = Updater(
            self.policy,
            reference,
            algorithm,
            rollout.temperature,
            rollout.max_new_tokens,
            model.hold_graphs,
            max_grad_norm,
        )
        self.strict_loading = not lora.is_lora(self.policy)  # LoRA checkpoints: adapters only
        self.media = MediaWriter(samples_every_n_steps, plots_every_n_steps)
        self.idle_rollouts = 0  # rollouts in a row without an optimizer step
        self.equivalence = AnswerEquivalence()
        self.val_accuracy_best = 0.0

    def setup(self, stage: str) -> None:
        if self.device.type == "cpu":
            set_threads(self.threads, processes=max(1, getattr(self.trainer, "num_devices", 1)))

    def on_fit_start(self) -> None:
        if self.global_rank == 0:
            log.info("val/accuracy reads answers with module.val_extractor=%s", self.val_extractor)
        if self.reference is not None:
            self.reference.to(self.device)
        self.updater.device = self.device

    def configure_model(self) -> None:
        """FSDP2: shard the policy (a copied reference stays whole on every process: its
        forwards then need no collectives; under LoRA the reference is the sharded policy)."""
        sharded = dist.is_sharded(self.policy)
        if isinstance(self.trainer.strategy, ModelParallelStrategy) and not sharded:
            compute = PRECISION_COMPUTE.get(str(self.trainer.precision))
            compute = None if compute == "float32" else torch_dtype(compute)
            dist.shard(self.policy, self.device_mesh["data_parallel"], compute)

    def state_dict(self, *args, **kwargs) -> dict:
        state = super().state_dict(*args, **kwargs)
        return lora.adapter_state(self, state) if lora.is_lora(self.policy) else state

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = all_rng_states()  # every rank's, for an exact resume

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore(checkpoint, self.state_dict(), self.trainer.world_size, self.global_rank)

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
        self.media.last_step = self.global_step - 1  # a resumed run's first rollout may be due

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
        rollout = self.sampler(self.policy, prompts, self.reward)
        self.timings = {"time/rollout_s": time.perf_counter() - start}
        return rollout

    def score(self, rollout: Rollout, labels: list[str | None]) -> Scored:
        start = time.perf_counter()
        # the rollout's replica already holds this step's weights: no second refresh
        view = self.scoring_view
        model = view.replica if view is self.sampler.view and view.replica else view(self.policy)
        step = self.trainer.fit_loop.epoch_loop.total_batch_idx  # rollouts so far
        scored = score_rollout(
            self.reward, model, self.tokenizer, rollout, labels, step, self.global_rank
        )
        self.timings["time/reward_s"] = time.perf_counter() - start
        if scored.counts["perf/scoring_tokens"]:
            self.timings["time/scoring_s"] = self.timings["time/reward_s"]
        self.scoring_counts = scored.counts
        scored.rewards = scored.rewards.to(self.device)
        return scored

    def plan_update(self, rollout: Rollout, rewards: torch.Tensor) -> UpdatePlan:
        return self.updater.plan(rollout, rewards, self.trainer.max_steps - self.global_step)

    def advantages(self, rollout: Rollout, rewards: torch.Tensor, plan: UpdatePlan):
        return self.updater.advantages(rollout, rewards, plan)

    def update(self, rollout: Rollout, advantages: torch.Tensor, plan: UpdatePlan) -> dict:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        return self.updater.update(
            rollout,
            advantages,
            plan,
            optimizer,
            scheduler,
            self.manual_backward,
            self.local_gradients,
        )

    def local_gradients(self):
        """A block whose backward passes keep gradients on this process: DDP's `no_sync`;
        under FSDP2 only with `strategy.accumulate_unsharded` (it costs memory there)."""
        strategy = self.trainer.strategy
        unsharded = getattr(strategy, "accumulate_unsharded", False)
        return dist.local_gradients(strategy.model, self.policy, sharded_too=unsharded)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip here: Lightning calls this inside the optimizer step, after a 16-mixed
        GradScaler has unscaled the gradients (once per step); clipping after
        `manual_backward` would see gradients scaled by ~65,536."""
        self.updater.clip_gradients()

    def log_step(
        self, rollout: Rollout, trained: Rollout, scored: Scored, plan: UpdatePlan, update: dict
    ) -> None:
        metrics = step_metrics(
            trained, scored, plan, update, self.timings, self.equivalence, self.updater.last_lr
        )
        metrics.update(self.sampler.metrics)
        self.log_rollout(dist.mean_across_ranks(metrics), shown=("reward/mean", "diag/accuracy"))
        boards = media_boards(self.loggers)
        if self.global_rank == 0 and boards:
            step, results, labels = self.step_at_rollout, scored.results, scored.labels
            self.media(boards, step, rollout, results, labels, self.equivalence)

    def log_rollout(self, metrics: dict[str, float], shown=()) -> None:
        """This rollout's values, at the optimizer step it began at, for callbacks (and the
        progress bar) and for the loggers. Lightning's logger would write them at its count of
        batches (rollouts), and write a filtered rollout's missing `train/` values again."""
        for name, value in metrics.items():
            self.log(name, value, on_step=True, batch_size=1, logger=False, prog_bar=name in shown)
        for logger in self.loggers:  # each writes on rank 0 only
            logger.log_metrics(metrics, step=self.step_at_rollout)
            logger.save()

    def on_validation_epoch_start(self) -> None:
        # weights fixed until the end
        hold_unregistered(self, "validation_model", self.sampler.view(self.policy))
        self.val_sums = torch.zeros(3, dtype=torch.float64)  # correct, responses, tokens

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Greedy pass@1 on this rank's share of the validation split (the data module deals
        each rank its own problems); the epoch's end sums every rank's."""
        with own_precision(self.validation_model):
            texts, lengths = greedy_responses(
                self.validation_model,
                self.tokenizer,
                batch["prompt"],
                self.chat_template,
                self.max_new_tokens,
            )
        correct = self.grade(texts, batch["answer"])
        self.val_sums += torch.tensor([sum(correct), len(correct), float(lengths.sum())])

    def on_validation_epoch_end(self) -> None:
        sums = dist.all_reduce_sum(self.val_sums.to(dist.collective_device()))
        correct, responses, tokens = sums.tolist()
        accuracy = correct / responses
        self.val_accuracy_best = max(self.val_accuracy_best, accuracy)
        # the same values on every rank: their max across ranks is each one
        values = {
            # Lightning's logger writes a logged `step` as the x axis (else its batch count):
            # the optimizer step of the weights measured
            "step": float(self.global_step),
            "val/accuracy": accuracy,
            "val/len_mean": tokens / responses,
            "val/accuracy_best": self.val_accuracy_best,
        }
        for name, value in values.items():
            self.log(name, value, batch_size=1, sync_dist=True, reduce_fx="max")

    def grade(self, texts: list[str], labels: list[str]) -> list[float]:
        """1.0 for each response whose answer, as `val_extractor` reads it, matches its label."""
        return [
            float(self.equivalence.is_correct(self.val_extract(text), label))
            for text, label in zip(texts, labels)
        ]
