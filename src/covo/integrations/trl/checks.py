"""What `CovoReward.bind` checks before a TRL run starts, and what each call checks of its rows.

Refused in one line naming the settings: a configuration that can split a prompt's group
across processes (training or evaluation), a sharding the reward cannot run under (FSDP1,
tensor parallelism), and logits changed after the output head. Said once, as a warning, with
the setting that avoids it: what makes a step's statistics or CoVo's keys and values cost a
second pass (dropout, a cache that is not plain full attention, a second scorer reward).
"""

from __future__ import annotations

import logging

import torch

from covo.integrations.trl.sharding import fsdp2_modules
from covo.rollout.context_cache import plain_layers

log = logging.getLogger(__name__)

GROUP_KEYS = "per_device_train_batch_size, steps_per_generation and num_generations"


def check_trainer(trainer) -> None:
    """`bind`'s refusals for `trainer`: whole groups in training and (with an evaluation
    dataset or strategy) in evaluation, then of its model: a sharding the reward runs under,
    the output head's own logits."""
    args = trainer.args
    check_whole_groups(
        args.per_device_train_batch_size, args.steps_per_generation, trainer.num_generations
    )
    evaluates = str(args.eval_strategy) not in ("no", "IntervalStrategy.NO")
    if evaluates or getattr(trainer, "eval_dataset", None) is not None:
        n_eval = getattr(trainer, "num_generations_eval", None) or trainer.num_generations
        check_whole_eval_groups(args.per_device_eval_batch_size, n_eval)
    model = trainer.accelerator.unwrap_model(trainer.model)
    check_strategy(trainer, model)
    check_logits(model)


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


def check_whole_eval_groups(per_device_eval_batch_size: int, num_generations_eval: int) -> None:
    """An evaluation batch of a process holds whole groups only when its rows are a multiple
    of the evaluation group size (else a group is split across processes or batches)."""
    if per_device_eval_batch_size % num_generations_eval:
        raise ValueError(
            f"covo rewards need whole groups in evaluation too: per_device_eval_batch_size"
            f" ({per_device_eval_batch_size}) is not a multiple of num_generations_eval"
            f" ({num_generations_eval})"
        )


def check_strategy(trainer, model: torch.nn.Module) -> None:
    """Refuses what `full_parameters` cannot run on: FSDP1 (its forwards need its own
    wrapper's hooks) and tensor parallelism (each forward is a collective over shards of every
    layer, and processes score different groups)."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is not None and getattr(plugin, "fsdp_version", 1) == 1 and not fsdp2_modules(model):
        raise ValueError(
            "covo rewards under FSDP need FSDP2 (fsdp_version: 2 in the accelerate config):"
            " FSDP1 is not supported"
        )
    if (getattr(model, "tp_size", None) or 1) > 1:
        raise ValueError(
            f"covo rewards score each process's own groups: tensor parallelism (tp_size"
            f" {model.tp_size}) is not supported; shard with FSDP2 or ZeRO-3 instead"
        )


def check_logits(model: torch.nn.Module) -> None:
    """covo's statistics read the output head's logits / T; a model that changes them after
    the head (Gemma 2/3's final softcapping, Cohere's logit_scale) is refused."""
    config = getattr(model, "config", None)
    for node in (config, getattr(config, "text_config", None)):
        if node is None:
            continue
        if getattr(node, "final_logit_softcapping", None) is not None:
            raise ValueError(
                f"covo rewards read the output head's raw logits: final_logit_softcapping"
                f" ({node.final_logit_softcapping}) changes them after the head; not supported"
            )
        if getattr(node, "logit_scale", None) not in (None, 1, 1.0):
            raise ValueError(
                f"covo rewards read the output head's raw logits: logit_scale"
                f" ({node.logit_scale}) changes them after the head; not supported"
            )


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether `model` drops units while it trains (a dropout module with p > 0, LoRA's too,
    or its config's attention dropout)."""
    attention = getattr(getattr(model, "config", None), "attention_dropout", 0.0) or 0.0
    return attention > 0 or any(
        isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()
    )


def plain_cache(model: torch.nn.Module) -> bool:
    """Whether the model's decoding cache keeps every key and value (no sliding window)."""
    from transformers import DynamicCache

    return plain_layers(DynamicCache(config=model.config)) is not None


def warn_fallbacks(reward, model: torch.nn.Module, ours: list) -> None:
    """One warning per setting that makes steps costlier than the capture: dropout
    (TRL samples with units dropped, so every step runs the batched forward), a cache
    that is not plain full attention, and a second scorer reward (the kept keys and values
    go to one of them; the other feeds the completions again). `reward`: the `CovoReward`
    being bound; `ours`: every covo reward of its trainer."""
    name = reward.__name__
    if has_dropout(model):
        log.warning(
            f"{name}: the policy has dropout (LoRA dropout too): each step's statistics"
            " come from a second, batched forward; set disable_dropout=True in GRPOConfig"
            " (or lora_dropout=0) to read them from generate"
        )
    if reward.uses_scorer and reward.capture_cache != "none" and not plain_cache(model):
        log.warning(
            f"{name}: the policy's cache is not plain full attention (a sliding window):"
            " CoVo's scorer feeds every trajectory again; the statistics still come from"
            " generate"
        )
    scorers = [f for f in ours if f.uses_scorer]
    if reward.uses_scorer and len(scorers) > 1 and scorers[-1] is reward:
        log.warning(
            f"{name}: {len(scorers)} covo rewards use the scorer: generate's keys and values"
            " go to the first called, the others feed the trajectories again; keep one"
            " scorer reward per trainer to avoid it"
        )
