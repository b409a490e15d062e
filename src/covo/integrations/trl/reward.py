"""A covo reward as a reward function of TRL's GRPOTrainer.

TRL calls a reward function on each process with that process's rows. A covo reward judges a
prompt's whole group with the live policy, so the rows must hold whole groups: `bind` refuses
a configuration that can split one across processes, and every call refuses rows that are not
whole contiguous groups. The policy's per-token statistics (and the keys and values CoVo's
scorer reuses) come from TRL's own generate call when it provably produced these rows
(`covo.integrations.trl.capture`), else from batched no-grad forwards over the call's
completions, each group's prompt once (`covo.rollout.groups`, at most `stats_token_budget`
tokens a forward); those forwards and CoVo's scorer run on the trainer's model (unwrapped from
DDP; under peft the adapted model), in eval mode, each module's mode restored after. Groups
are built, scored and freed one at a time, so the keys and values alive are those of one
group. Labels (`label_column`) reach only rewards that set `needs_labels`; the diagnostics
read them too, as in covo's own trainer. Each reward's components and diagnostics, and the
completions' token entropy and self-certainty, are logged through TRL's `log_metric` under
covo's names (each prefixed with `<reward name>/` when two covo rewards share a trainer).

Under sharded parameters (FSDP2, DeepSpeed ZeRO-3) each call runs on the full parameters,
gathered once (`covo.integrations.trl.sharding`). What `bind` refuses and warns of, and the
check of each call's rows: `covo.integrations.trl.checks`.
"""

from __future__ import annotations

import contextlib
import copy
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf

from covo.answers import AnswerEquivalence
from covo.infra.checks import instantiate
from covo.infra.errors import installed
from covo.integrations.trl.capture import (
    CaptureLifetime,
    GenerationCapture,
    moved,
)
from covo.integrations.trl.checks import check_trainer, group_starts, warn_fallbacks
from covo.integrations.trl.config import device_token_budget, integration_config
from covo.integrations.trl.guard import CollapseGuardCallback
from covo.integrations.trl.sharding import full_parameters
from covo.metrics.step import group_token_metrics, reward_metrics
from covo.models import lora
from covo.models.lora import MissingExtraError
from covo.rewards.base import Group, GroupReward, label_for
from covo.rewards.covo.scorer import SCORING_DTYPES, PrefixSharedScorer
from covo.rollout.groups import group_from_ids, group_of
from covo.rollout.views import declared_views, view_prompts

MISSING = (
    "covo.integrations.trl needs TRL: pip install -e '.[trl]' (or `bash scripts/setup.sh trl`)"
)


@contextlib.contextmanager
def inference(model: torch.nn.Module):
    """`model` in eval mode without gradients; each module's own mode back afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def strip_eos(ids: Sequence[int], eos: set[int]) -> list[int]:
    """TRL's completion ids end with the EOS token when one was sampled; a `Group` holds none."""
    ids = list(ids)
    return ids[:-1] if ids and ids[-1] in eos else ids


def cut_at_eos(ids: list[int], eos: set[int]) -> list[int]:
    """A generated row up to its first EOS (without it)."""
    for i, token in enumerate(ids):
        if token in eos:
            return ids[:i]
    return ids


def put_through(prompt, template: str):
    """A TRL prompt (text, or a conversation) put through a view's template: the text, or the
    conversation's last user message."""
    if isinstance(prompt, str):
        return view_prompts([prompt], template)[0]
    messages = [dict(m) for m in prompt]
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last]["content"] = view_prompts([messages[last]["content"]], template)[0]
    return messages


class RecordedRollout:
    """A custom `rollout_func` of TRL, recording the prompt ids it generated from, which a
    reward call scores the completions behind (TRL's re-tokenisation of the prompts may differ:
    another template, system prompt or truncation)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.prompt_ids: list | None = None

    def __call__(self, prompts, trainer):
        out = self.inner(prompts, trainer)
        self.prompt_ids = [list(ids) for ids in out["prompt_ids"]]
        return out

    def take(self, rows: int) -> list | None:
        """The recorded prompt ids, once, when they are `rows` rows (this call's)."""
        ids, self.prompt_ids = self.prompt_ids, None
        return ids if ids is not None and len(ids) == rows else None


class CovoReward:
    """A covo reward (`reward`: conf/reward name or YAML path; `overrides` as in
    `integration_config`) as a TRL reward function. Call `bind(trainer)` once the
    GRPOTrainer exists (or build it with `grpo_trainer`). A plain callable, not an
    `nn.Module`: TRL would take a module for a sequence-classification reward model.
    `guard`: the collapse guard `bind` adds to the trainer (None with
    `callbacks.collapse_guard=null`). The trainer is held by a weak reference."""

    def __init__(self, reward: str, overrides: Sequence[str] = ()) -> None:
        if not installed("trl"):
            raise MissingExtraError(MISSING)
        cfg = integration_config(reward, overrides)
        self.reward = instantiate(cfg.reward)
        self.views = declared_views(self.reward)
        self.label_column = cfg.label_column
        self.scoring_dtype = SCORING_DTYPES[cfg.scoring_dtype]
        self.token_budget = cfg.stats_token_budget
        self.capture_cache = cfg.capture_cache
        guard = OmegaConf.select(cfg, "callbacks.collapse_guard")
        self.guard = CollapseGuardCallback.from_config(guard) if guard else None
        self.needs_labels = getattr(self.reward, "needs_labels", False)
        self.uses_scorer = getattr(self.reward, "uses_scorer", False)
        self.equivalence = getattr(self.reward, "equivalence", None) or AnswerEquivalence()
        self.__name__ = Path(reward).stem  # TRL's name for it: rewards/<name>/mean
        self.trainer_ref = None
        self.capture: GenerationCapture | None = None
        self.prefix = ""  # `<name>/` when another covo reward shares the trainer

    @property
    def trainer(self):
        return None if self.trainer_ref is None else self.trainer_ref()

    def bind(self, trainer) -> CovoReward:
        """Score with `trainer`'s live policy; refuses a setup that can split a group (in
        training or evaluation), a sharding it cannot run under and logits it cannot read;
        says once what makes a step fall back to the batched forward. Puts the guard first
        among the trainer's callbacks, so the ones that report a log (printer, TensorBoard,
        W&B) see its values, and a `GenerationCapture` in place of the policy's `generate`
        (once per model, however often bound)."""
        if not any(func is self for func in trainer.reward_funcs):
            raise ValueError("bind: this CovoReward is not among the trainer's reward_funcs")
        check_trainer(trainer)
        model = trainer.accelerator.unwrap_model(trainer.model)
        ours = [f for f in trainer.reward_funcs if isinstance(f, CovoReward)]
        names = [f.__name__ for f in ours]
        if len(set(names)) < len(names):
            raise ValueError(
                f"two covo rewards named '{self.__name__}' on one trainer: their metrics would"
                " mix; give one a YAML file of another name"
            )
        for other in ours:
            other.prefix = f"{other.__name__}/" if len(ours) > 1 else ""
            if other.guard is not None:
                other.guard.prefix = other.prefix
        self.trainer_ref = weakref.ref(trainer)
        cache = self.capture_cache if self.uses_scorer else "none"
        self.capture = GenerationCapture.install(trainer, cache)
        warn_fallbacks(self, model, ours)
        rollout = getattr(trainer, "rollout_func", None)
        if rollout is not None and not isinstance(rollout, RecordedRollout):
            trainer.rollout_func = RecordedRollout(rollout)
        callbacks = trainer.callback_handler.callbacks
        if not any(isinstance(c, CaptureLifetime) and c.capture is self.capture for c in callbacks):
            callbacks.append(CaptureLifetime(self.capture))
        if self.guard is not None and self.guard not in callbacks:
            callbacks.insert(0, self.guard)
        return self

    def __call__(
        self, prompts: list, completions: list, completion_ids: list, log_metric=None, **columns
    ) -> list[float]:
        trainer = self.trainer
        if trainer is None:
            raise ValueError("CovoReward is not bound: call reward.bind(trainer) first")
        start = time.perf_counter()
        n = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        model = trainer.accelerator.unwrap_model(trainer.model)
        starts = group_starts(prompts, n)
        labels = self.labels(columns, starts)
        # the prompt ids the completions were sampled from: a custom rollout_func's own, else
        # the prompts exactly as TRL tokenised them (chat template, tools, its kwargs)
        rollout = getattr(trainer, "rollout_func", None)
        prompt_ids = rollout.take(len(prompts)) if isinstance(rollout, RecordedRollout) else None
        if prompt_ids is None:
            prompt_ids = trainer._tokenize_prompts(prompts)[0]
        eos = set(trainer.eos_token_ids)
        responses = [strip_eos(ids, eos) for ids in completion_ids]
        captured = self.capture and self.capture.take(
            prompt_ids, completion_ids, responses, self.uses_scorer
        )
        groups, results, statistics_s = [], [], 0.0
        with full_parameters(trainer, model), inference(model):
            policy = lora.base_of(model)  # under peft: the causal LM with its adapters on
            budget = self.token_budget or device_token_budget(policy)
            scorer = PrefixSharedScorer(policy, self.tokenizer(trainer), self.scoring_dtype)
            for index, (s, label) in enumerate(zip(starts, labels)):
                built = time.perf_counter()
                rows = range(s, s + n)
                response = [responses[r] for r in rows]
                group = self.group(
                    trainer, policy, prompt_ids[s], response, label, captured, rows, index, budget
                )
                group.views = self.sample_views(trainer, policy, prompts[s], n, budget)
                statistics_s += time.perf_counter() - built
                if captured and captured[1] is not None:
                    captured[1][s : s + n] = [None] * n  # the group holds its rows' now
                results.append(self.reward(group, scorer))
                group.context_caches = None  # this group's keys and values go before the next's
                for view in group.views.values():
                    view.context_caches = None
                groups.append(group)
        rewards = [float(r) for res in results for r in res.rewards]
        if log_metric is not None:
            own = {
                "time/statistics_s": statistics_s,
                "perf/stats_from_generate": float(bool(captured)),
            }
            own["time/reward_s"] = time.perf_counter() - start
            self.log(log_metric, groups, results, rewards, labels, own, scorer)
        return rewards

    @staticmethod
    def tokenizer(trainer):
        return getattr(trainer.processing_class, "tokenizer", trainer.processing_class)

    def labels(self, columns: dict, starts: range) -> list[str | None]:
        """Each group's label from `label_column` (None without that column)."""
        values = columns.get(self.label_column)
        if values is None:
            if self.needs_labels:
                raise ValueError(
                    f"reward needs labels: the dataset has no column '{self.label_column}'"
                    " (label_column)"
                )
            return [None] * len(starts)
        return [None if values[s] is None else str(values[s]) for s in starts]

    def group(
        self, trainer, policy, prompt_ids, responses, label, captured, rows, index, budget
    ) -> Group:
        """The group of `responses` (rows `rows` of the call) to `prompt_ids`: its statistics
        (and kept keys and values, moved to the policy's device) from TRL's generate call when
        `captured` holds them, else from the batched forwards."""
        tokenizer = self.tokenizer(trainer)
        args = (
            list(prompt_ids),
            responses,
            [tokenizer.decode(ids, skip_special_tokens=True) for ids in responses],
            label_for(self.reward, label),
        )
        where = dict(
            step=trainer.state.global_step, rank=trainer.accelerator.process_index, index=index
        )
        if captured:
            stats, caches = captured
            if caches is not None:
                caches = [
                    None if caches[r] is None else moved(caches[r], policy.device) for r in rows
                ]
            return group_of(*args, [stats[r] for r in rows], caches, **where)
        return group_from_ids(
            policy,
            *args,
            keep_cache=self.uses_scorer,
            temperature=trainer.temperature,
            token_budget=budget,
            **where,
        )

    def sample_views(self, trainer, policy, prompt, n: int, budget: int) -> dict[str, Group]:
        """The groups of the views the reward compares (self_harmony), which TRL's rollout does
        not sample: here, `n` responses from the live policy to `prompt` put through each view
        (the last user message of a conversation), with TRL's own generation settings
        (`trainer.generation_config`: temperature, top-p, top-k, min-p, repetition penalty,
        completion length and `generation_kwargs`). One generate call per group and view."""
        tokenizer, eos = self.tokenizer(trainer), set(trainer.eos_token_ids)
        config = copy.deepcopy(trainer.generation_config)  # a copy: not TRL's call to capture
        config.num_return_sequences = n
        config.return_dict_in_generate = False
        views = {}
        for name, template in self.views.items():
            [ids] = trainer._tokenize_prompts([put_through(prompt, template)])[0]
            sequence = torch.tensor([list(ids)], device=policy.device)
            out = policy.generate(
                input_ids=sequence,
                attention_mask=torch.ones_like(sequence),
                generation_config=config,
            )[:, sequence.shape[1] :]
            responses = [cut_at_eos(row, eos) for row in out.tolist()]
            views[name] = group_from_ids(
                policy,
                list(ids),
                responses,
                [tokenizer.decode(r, skip_special_tokens=True) for r in responses],
                None,
                temperature=trainer.temperature,
                token_budget=budget,
            )
        return views

    def log(self, log_metric, groups, results: list[GroupReward], rewards, labels, own, scorer):
        """covo's step metrics of the call, each prefixed with `prefix`; `own`:
        `time/reward_s` (the whole call), `time/statistics_s` (its part building the groups'
        statistics) and `perf/stats_from_generate` (1 when those came from TRL's generate
        call, else 0)."""
        metrics = reward_metrics(results, torch.tensor(rewards), labels, self.equivalence)
        metrics |= group_token_metrics(groups) | own
        if scorer.tokens_processed:
            metrics["perf/scoring_tokens"] = float(scorer.tokens_processed)
            metrics["perf/scoring_reused_tokens"] = float(scorer.reused_tokens)
        for name, value in metrics.items():
            log_metric(self.prefix + name, value)


def grpo_trainer(reward: CovoReward, reward_funcs: Sequence = (), **kwargs):
    """TRL's GRPOTrainer with `reward` (then `reward_funcs`) as its rewards, `reward` bound."""
    try:
        from trl import GRPOTrainer
    except ImportError:
        raise MissingExtraError(MISSING) from None
    trainer = GRPOTrainer(reward_funcs=[reward, *reward_funcs], **kwargs)
    reward.bind(trainer)
    return trainer
