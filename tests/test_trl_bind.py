"""What `bind` checks and says before a TRL run starts: evaluation groups kept whole,
shardings it cannot run under and logits it cannot read refused in one line, each setting that
makes steps costlier named once, two covo rewards logging under their own names, and
self_harmony's views sampled with TRL's own generation settings."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import grpo_config
from test_trl_integration import adapted_tiny, dataset, trainer_with, trl_rows

pytest.importorskip("trl")
from covo.integrations.trl import CovoReward, checks, grpo_trainer  # noqa: E402
from covo.integrations.trl import config as trl_config  # noqa: E402
from covo.models.loading import build_tiny  # noqa: E402

torch.set_num_threads(1)


def test_bind_refuses_evaluation_groups_split_across_processes():
    """2 processes x 2 eval rows: TRL accepts (4 divides by num_generations_eval 4), but each
    process would hold half a group."""
    reward = CovoReward("majority")
    args = SimpleNamespace(
        per_device_train_batch_size=4,
        steps_per_generation=1,
        per_device_eval_batch_size=2,
        eval_strategy="steps",
    )
    trainer = SimpleNamespace(
        reward_funcs=[reward], args=args, num_generations=4, num_generations_eval=4
    )
    with pytest.raises(ValueError) as err:
        reward.bind(trainer)
    assert str(err.value) == (
        "covo rewards need whole groups in evaluation too: per_device_eval_batch_size (2) is"
        " not a multiple of num_generations_eval (4)"
    )


def test_strategies_it_cannot_run_under_are_one_line():
    fsdp1 = SimpleNamespace(
        accelerator=SimpleNamespace(
            state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1))
        )
    )
    with pytest.raises(ValueError, match=r"^covo rewards under FSDP need FSDP2 \(fsdp_version: 2"):
        checks.check_strategy(fsdp1, build_tiny().model)
    plain = SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None)))
    model = build_tiny().model
    checks.check_strategy(plain, model)  # a whole model: nothing to refuse
    model._tp_size = 2
    with pytest.raises(ValueError, match=r"tensor parallelism \(tp_size 2\) is not supported"):
        checks.check_strategy(plain, model)


@pytest.mark.parametrize(
    ("key", "value"), [("final_logit_softcapping", 30.0), ("logit_scale", 0.0625)]
)
def test_logits_changed_after_the_head_are_refused(key, value, tmp_path):
    loaded = build_tiny()
    setattr(loaded.model.config, key, value)
    with pytest.raises(
        ValueError, match=rf"^covo rewards read the output head's raw logits: {key}"
    ):
        trainer_with(CovoReward("covo"), tmp_path, loaded)


def test_the_device_budget_from_free_memory():
    """Qwen2.5-7B's shape in bf16 with 40 GiB free: 2 x 28 x 4 x 128 + 16 x 3584 = 86,016
    values a token, 172,032 bytes; 5% of 40 GiB / that = 12,483 tokens."""
    config = SimpleNamespace(
        num_attention_heads=28, hidden_size=3584, num_key_value_heads=4, num_hidden_layers=28
    )
    assert trl_config.token_budget_for(config, 2, 40 * 2**30) == 12483
    assert trl_config.token_budget_for(config, 2, 2**30) == 1024  # at least
    assert trl_config.token_budget_for(config, 2, 2**40) == 65536  # at most


def test_two_covo_rewards_log_under_their_own_names(tmp_path):
    first, second = CovoReward("covo"), CovoReward("majority")
    loaded = build_tiny()
    trainer = grpo_trainer(
        first,
        reward_funcs=[second],
        model=loaded.model,
        processing_class=loaded.tokenizer,
        args=grpo_config(tmp_path),
        train_dataset=dataset(),
    )
    second.bind(trainer)
    inputs, prompts, completions, ids = trl_rows(trainer.processing_class)
    for reward in (first, second):
        logged = {}
        rewards = reward(
            prompts=prompts,
            completions=completions,
            completion_ids=ids,
            log_metric=logged.__setitem__,
        )
        name = reward.__name__
        assert all(key.startswith(f"{name}/") for key in logged)
        assert logged[f"{name}/reward/mean"] == pytest.approx(sum(rewards) / len(rewards))
        assert reward.guard.prefix == f"{name}/"
    with pytest.raises(ValueError, match="two covo rewards named 'covo'"):
        other = CovoReward("covo")
        trainer.reward_funcs.append(other)
        other.bind(trainer)


def test_settings_that_cost_a_second_forward_are_named_once_at_bind(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="covo.integrations.trl.checks"):
        trainer_with(CovoReward("self_certainty"), tmp_path, adapted_tiny(0.1))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "disable_dropout=True" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="covo.integrations.trl.checks"):
        trainer_with(CovoReward("self_certainty"), tmp_path, adapted_tiny(0.0))
    assert not caplog.records
    caplog.clear()
    sliding = build_tiny()
    sliding.model.config.layer_types = ["sliding_attention"] * 2
    sliding.model.config.sliding_window = 4
    with caplog.at_level(logging.WARNING, logger="covo.integrations.trl.checks"):
        trainer_with(CovoReward("covo_paper"), tmp_path, sliding)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "not plain full attention" in line and "statistics still come from generate" in line
    caplog.clear()
    first, second = CovoReward("covo"), CovoReward("covo_paper")
    loaded = build_tiny()
    with caplog.at_level(logging.WARNING, logger="covo.integrations.trl.checks"):
        trainer = grpo_trainer(
            first,
            reward_funcs=[second],
            model=loaded.model,
            processing_class=loaded.tokenizer,
            args=grpo_config(tmp_path),
            train_dataset=dataset(),
        )
        second.bind(trainer)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("covo_paper: 2 covo rewards use the scorer")


class Recorder:
    """Stands in for the model's `generate`: records each call's keyword arguments."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self.inner(*args, **kwargs)


def test_views_sample_with_trls_own_generation_settings(tmp_path):
    """The model's own generation_config says top_k 1 and repetition_penalty 2.0; TRL's
    settings (top_k 5, min_p 0.05, repetition_penalty 1.3, a generation_kwargs entry) are what
    the views' generate gets."""
    loaded = build_tiny()
    loaded.model.generation_config.top_k = 1
    loaded.model.generation_config.repetition_penalty = 2.0
    reward = CovoReward("self_harmony")
    trainer = trainer_with(
        reward,
        tmp_path,
        loaded,
        temperature=0.7,
        top_k=5,
        min_p=0.05,
        repetition_penalty=1.3,
        generation_kwargs={"no_repeat_ngram_size": 3},
    )
    recorder = loaded.model.generate = Recorder(loaded.model.generate)
    inputs, prompts, completions, ids = trl_rows(trainer.processing_class)
    reward(prompts=prompts, completions=completions, completion_ids=ids)
    assert len(recorder.calls) == 2  # one view, two groups
    for call in recorder.calls:
        config = call["generation_config"]
        assert (config.top_k, config.min_p, config.repetition_penalty) == (5, 0.05, 1.3)
        assert (config.temperature, config.no_repeat_ngram_size) == (0.7, 3)
        assert (config.max_new_tokens, config.num_return_sequences) == (16, 4)
        assert config is not trainer.generation_config


class PromptSpy:
    """Stands in for a reward's judge: records each group's prompt ids."""

    def __init__(self, inner):
        self.inner, self.prompts = inner, []

    def __call__(self, group, scorer):
        self.prompts.append(group.prompt_ids)
        return self.inner(group, scorer)


def test_a_custom_rollouts_prompt_ids_are_the_ones_scored(tmp_path):
    """A rollout_func that generated from other prompt ids than TRL's tokenisation (here: a
    system token in front): the completions are scored behind the ids they were sampled from."""
    loaded = build_tiny()
    reward = CovoReward("self_certainty")
    inputs, prompts, completions, ids = trl_rows(loaded.tokenizer)

    def rollout(batch, trainer):
        own = [[7, *row] for row in trainer._tokenize_prompts(batch)[0]]
        return {"prompt_ids": own, "completion_ids": ids, "logprobs": None}

    trainer = grpo_trainer(
        reward,
        model=loaded.model,
        processing_class=loaded.tokenizer,
        args=grpo_config(tmp_path),
        train_dataset=dataset(),
        rollout_func=rollout,
    )
    spy = reward.reward = PromptSpy(reward.reward)
    out = trainer.rollout_func(prompts, trainer)
    reward(prompts=prompts, completions=completions, completion_ids=ids)
    assert spy.prompts == [out["prompt_ids"][0], out["prompt_ids"][4]]
    assert (
        spy.prompts[0][0] == 7
        and spy.prompts[0][1:] == trainer._tokenize_prompts(prompts[:1])[0][0]
    )
    reward(prompts=prompts, completions=completions, completion_ids=ids)  # no rollout since
    assert spy.prompts[2] == spy.prompts[0][1:]
