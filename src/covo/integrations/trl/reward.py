"""A covo reward as a reward function of TRL's GRPOTrainer.

TRL calls a reward function on each process with that process's rows. A covo reward judges a
prompt's whole group with the live policy, so the rows must hold whole groups: `bind` refuses
a configuration that can split one across processes, and every call refuses rows that are not
whole contiguous groups. The policy's per-token statistics (and the keys and values CoVo's
scorer reuses) come from TRL's own generate call when it provably produced these rows
(`covo.integrations.trl.capture`), else from batched no-grad forwards over the call's
completions, each group's prompt once (`covo.rollout.groups`, at most `stats_token_budget`
tokens a forward); those forwards and CoVo's scorer run on the trainer's model (unwrapped from
DDP; under peft the adapted model), in eval mode, each module's mode restored after. Labels
(`label_column`) reach only rewards that set `needs_labels`; the diagnostics read them too, as
in covo's own trainer. Each reward's components and diagnostics, and the completions' token
entropy and self-certainty, are logged through TRL's `log_metric` under covo's names.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.initialize import get_gh_backup, restore_gh_from_backup
from omegaconf import DictConfig, OmegaConf

from covo.answers import AnswerEquivalence
from covo.infra.checks import INT_GE1, apply_rules, instantiate
from covo.infra.configs import conf_dir
from covo.infra.errors import SettingError, installed
from covo.integrations.trl.capture import GenerationCapture
from covo.integrations.trl.guard import CollapseGuardCallback
from covo.metrics.step import group_token_metrics, reward_metrics
from covo.models import lora
from covo.models.lora import MissingExtraError
from covo.rewards.base import Group, GroupReward, label_for
from covo.rewards.covo.scorer import SCORING_DTYPE_RULE, SCORING_DTYPES, PrefixSharedScorer
from covo.rollout.groups import group_from_ids, group_of
from covo.rollout.views import declared_views, view_prompts

CONF_DIR = conf_dir()
MISSING = (
    "covo.integrations.trl needs TRL: pip install -e '.[trl]' (or `bash scripts/setup.sh trl`)"
)
GROUP_KEYS = "per_device_train_batch_size, steps_per_generation and num_generations"


@contextlib.contextmanager
def own_hydra(config_dir: Path):
    """Hydra initialised on `config_dir` for the block, whatever Hydra app is running."""
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir.resolve()), version_base="1.3"):
            yield
    finally:
        restore_gh_from_backup(backup)


def integration_config(reward: str, overrides: Sequence[str] = ()) -> DictConfig:
    """conf/integrations/trl.yaml with `reward` a conf/reward name or a reward YAML's path
    (its defaults list resolved in its own folder); `overrides` in Hydra's syntax
    (`label_column=solution`, `reward.threshold=0.6`)."""
    path = Path(reward).expanduser()
    is_path = reward.endswith((".yaml", ".yml"))
    if is_path and not path.is_file():
        raise ValueError(f"reward: no such file {path}")
    if not is_path and not (CONF_DIR / "reward" / f"{reward}.yaml").is_file():
        raise ValueError(f"unknown reward '{reward}': no conf/reward/{reward}.yaml")
    ours = [o for o in overrides if not (is_path and o.startswith("reward."))]
    with own_hydra(CONF_DIR):
        try:
            cfg = compose("integrations/trl", [*([] if is_path else [f"reward={reward}"]), *ours])
        except ConfigCompositionException as err:  # an unknown key: Hydra's first line names it
            raise SettingError(str(err).splitlines()[0]) from None
    if is_path:
        own = [o.removeprefix("reward.") for o in overrides if o.startswith("reward.")]
        with own_hydra(path.parent):
            cfg.reward = compose(path.stem, own)
    apply_rules(cfg, [SCORING_DTYPE_RULE, ("stats_token_budget", *INT_GE1)])
    return cfg


def check_whole_groups(
    per_device_train_batch_size: int, steps_per_generation: int, num_generations: int
) -> None:
    """Each process generates per_device_train_batch_size x steps_per_generation rows of the
    sampler's prompt-major order: whole groups only when that is a multiple of the group size."""
    rows = per_device_train_batch_size * steps_per_generation
    if rows % num_generations:
        raise ValueError(
            f"covo rewards need whole groups on every process: per_device_train_batch_size"
            f" ({per_device_train_batch_size}) x steps_per_generation ({steps_per_generation})"
            f" = {rows} is not a multiple of num_generations ({num_generations})"
        )


def group_starts(prompts: list, num_generations: int) -> range:
    """First row of each group; refuses rows that are not whole contiguous groups (the same
    prompt `num_generations` times in a row)."""
    starts = range(0, len(prompts), num_generations)
    whole = len(prompts) % num_generations == 0 and all(
        prompts[r] == prompts[s] for s in starts for r in range(s, s + num_generations)
    )
    if not whole:
        raise ValueError(
            f"covo rewards need whole groups: these {len(prompts)} rows are not whole runs of"
            f" num_generations ({num_generations}) identical prompts; keep"
            f" per_device_train_batch_size x steps_per_generation a multiple of num_generations"
        )
    return starts


def check_strategy(accelerator) -> None:
    """Sharded parameters make every forward a collective: each process scores its own
    groups (different token counts), so FSDP and ZeRO-3 would hang; refused up front."""
    kind = str(accelerator.distributed_type)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if "FSDP" in kind or (plugin is not None and plugin.zero_stage == 3):
        raise ValueError(
            f"covo rewards run the policy on each process's own groups: {kind} shards its"
            " parameters (FSDP, DeepSpeed ZeRO-3), which is not supported"
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


class CovoReward:
    """A covo reward (`reward`: conf/reward name or YAML path; `overrides` as in
    `integration_config`) as a TRL reward function. Call `bind(trainer)` once the
    GRPOTrainer exists (or build it with `grpo_trainer`). A plain callable, not an
    `nn.Module`: TRL would take a module for a sequence-classification reward model.
    `guard`: the collapse guard `bind` adds to the trainer (None with
    `callbacks.collapse_guard=null`)."""

    def __init__(self, reward: str, overrides: Sequence[str] = ()) -> None:
        if not installed("trl"):
            raise MissingExtraError(MISSING)
        cfg = integration_config(reward, overrides)
        self.reward = instantiate(cfg.reward)
        self.views = declared_views(self.reward)
        self.label_column = cfg.label_column
        self.scoring_dtype = SCORING_DTYPES[cfg.scoring_dtype]
        self.token_budget = cfg.stats_token_budget
        guard = OmegaConf.select(cfg, "callbacks.collapse_guard")
        self.guard = CollapseGuardCallback.from_config(guard) if guard else None
        self.needs_labels = getattr(self.reward, "needs_labels", False)
        self.uses_scorer = getattr(self.reward, "uses_scorer", False)
        self.equivalence = getattr(self.reward, "equivalence", None) or AnswerEquivalence()
        self.__name__ = Path(reward).stem  # TRL's name for it: rewards/<name>/mean
        self.trainer = None
        self.capture: GenerationCapture | None = None

    def bind(self, trainer) -> CovoReward:
        """Score with `trainer`'s live policy; refuses a setup that can split a group. Puts
        the guard first among the trainer's callbacks, so the ones that report a log (printer,
        TensorBoard, W&B) see its values, and a `GenerationCapture` in place of the policy's
        `generate` (once per model, however often bound)."""
        if not any(func is self for func in trainer.reward_funcs):
            raise ValueError("bind: this CovoReward is not among the trainer's reward_funcs")
        args = trainer.args
        check_whole_groups(
            args.per_device_train_batch_size, args.steps_per_generation, trainer.num_generations
        )
        check_strategy(trainer.accelerator)
        self.trainer = trainer
        self.capture = GenerationCapture.install(trainer, keep_cache=self.uses_scorer)
        callbacks = trainer.callback_handler.callbacks
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
        # the prompts exactly as TRL tokenised them (chat template, tools, its kwargs)
        prompt_ids = trainer._tokenize_prompts(prompts)[0]
        with inference(model):
            policy = lora.base_of(model)  # under peft: the causal LM with its adapters on
            groups, captured = self.groups(
                trainer, policy, prompt_ids, completion_ids, starts, labels
            )
            for group, s in zip(groups, starts):
                group.views = self.sample_views(trainer, policy, prompts[s], n)
            own = {"time/statistics_s": time.perf_counter() - start}
            own["perf/stats_from_generate"] = float(captured)
            scorer = PrefixSharedScorer(policy, self.tokenizer(trainer), self.scoring_dtype)
            results = [self.reward(group, scorer) for group in groups]
        rewards = [float(r) for res in results for r in res.rewards]
        if log_metric is not None:
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

    def groups(
        self, trainer, policy, prompt_ids, completion_ids, starts, labels
    ) -> tuple[list[Group], bool]:
        """One group per start, and whether its statistics (and kept keys and values) came
        from TRL's generate call rather than the batched forwards."""
        tokenizer, eos, n = self.tokenizer(trainer), set(trainer.eos_token_ids), starts.step
        responses = [strip_eos(ids, eos) for ids in completion_ids]
        captured = self.capture and self.capture.take(
            prompt_ids, completion_ids, responses, self.uses_scorer
        )
        groups = []
        for index, (s, label) in enumerate(zip(starts, labels)):
            rows = range(s, s + n)
            args = (
                list(prompt_ids[s]),
                responses[s : s + n],
                [tokenizer.decode(responses[r], skip_special_tokens=True) for r in rows],
                label_for(self.reward, label),
            )
            where = dict(
                step=trainer.state.global_step,
                rank=trainer.accelerator.process_index,
                index=index,
            )
            if captured:
                stats, caches = captured
                caches = [caches[r] for r in rows] if caches else None
                groups.append(group_of(*args, [stats[r] for r in rows], caches, **where))
                continue
            groups.append(
                group_from_ids(
                    policy,
                    *args,
                    keep_cache=self.uses_scorer,
                    temperature=trainer.temperature,
                    token_budget=self.token_budget,
                    **where,
                )
            )
        return groups, bool(captured)

    def sample_views(self, trainer, policy, prompt, n: int) -> dict[str, Group]:
        """The groups of the views the reward compares (self_harmony), which TRL's rollout does
        not sample: here, `n` responses from the live policy to `prompt` put through each view
        (the last user message of a conversation), at TRL's temperature, top-p and completion
        length, as covo's rollout samples them. One generate call per group and view."""
        tokenizer, eos = self.tokenizer(trainer), set(trainer.eos_token_ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
        views = {}
        for name, template in self.views.items():
            [ids] = trainer._tokenize_prompts([put_through(prompt, template)])[0]
            sequence = torch.tensor([list(ids)], device=policy.device)
            out = policy.generate(
                sequence,
                attention_mask=torch.ones_like(sequence),
                do_sample=True,
                temperature=trainer.temperature,
                top_p=trainer.top_p,
                max_new_tokens=trainer.max_completion_length,
                num_return_sequences=n,
                pad_token_id=pad,
            )[:, sequence.shape[1] :]
            responses = [cut_at_eos(row, eos) for row in out.tolist()]
            views[name] = group_from_ids(
                policy,
                list(ids),
                responses,
                [tokenizer.decode(r, skip_special_tokens=True) for r in responses],
                None,
                temperature=trainer.temperature,
                token_budget=self.token_budget,
            )
        return views

    def log(self, log_metric, groups, results: list[GroupReward], rewards, labels, own, scorer):
        """covo's step metrics of the call; `own`: `time/reward_s` (the whole call),
        `time/statistics_s` (its part up to the groups' statistics) and
        `perf/stats_from_generate` (1 when those came from TRL's generate call, else 0)."""
        metrics = reward_metrics(results, torch.tensor(rewards), labels, self.equivalence)
        metrics |= group_token_metrics(groups) | own
        if scorer.tokens_processed:
            metrics["perf/scoring_tokens"] = float(scorer.tokens_processed)
            metrics["perf/scoring_reused_tokens"] = float(scorer.reused_tokens)
        for name, value in metrics.items():
            log_metric(name, value)


def grpo_trainer(reward: CovoReward, reward_funcs: Sequence = (), **kwargs):
    """TRL's GRPOTrainer with `reward` (then `reward_funcs`) as its rewards, `reward` bound."""
    try:
        from trl import GRPOTrainer
    except ImportError:
        raise MissingExtraError(MISSING) from None
    trainer = GRPOTrainer(reward_funcs=[reward, *reward_funcs], **kwargs)
    reward.bind(trainer)
    return trainer
