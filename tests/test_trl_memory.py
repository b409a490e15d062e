"""What the covo reward keeps alive inside TRL: generate's padded cache goes right after
generate, each row's own keys and values are handed over once and dropped by any call that
cannot use them, the groups' keys and values live one group at a time, nothing is captured
while TRL runs tools, and the trainer is freed when the user lets it go."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from conftest import GROUPS_OF_FOUR
from test_trl_integration import N, trainer_with, trl_rows

pytest.importorskip("trl")
from covo.integrations.trl import CovoReward  # noqa: E402
from covo.integrations.trl.reward import strip_eos  # noqa: E402
from covo.models.loading import build_tiny  # noqa: E402
from covo.rollout.context_cache import ContextCache, cache_of  # noqa: E402

torch.set_num_threads(1)


def trl_generate(trainer, tools: list | None = None):
    """TRL's generate call (left-padded prompts of GROUPS_OF_FOUR and one longer prompt, its
    own generation config) through the model's `generate`, with TRL's `tools` on; the prompt
    ids and sequences."""
    texts = [item["prompt"] for item in GROUPS_OF_FOUR]
    texts.append("What is 12 + 7 when you add them and then some more words?")
    prompt_ids = trainer._tokenize_prompts([[{"role": "user", "content": t}] for t in texts])[0]
    width, pad = max(map(len, prompt_ids)), trainer.processing_class.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in prompt_ids])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids])
    torch.manual_seed(0)
    trainer.tools = tools or []
    model = trainer.accelerator.unwrap_model(trainer.model)
    sequences = model.generate(
        input_ids=input_ids, attention_mask=mask, generation_config=trainer.generation_config
    )
    return prompt_ids, sequences


class CacheSpy:
    """Stands in for the model's own generate under the capture: weak references to the
    cache each call returned."""

    def __init__(self, original):
        self.original, self.caches = original, []

    def __call__(self, *args, **kwargs):
        out = self.original(*args, **kwargs)
        self.caches.append(weakref.ref(cache_of(out)))
        return out


def test_the_padded_cache_goes_after_generate_and_rows_keep_their_own_tokens(tmp_path):
    reward = CovoReward("covo_paper")
    trainer = trainer_with(reward, tmp_path)
    capture = reward.capture
    spy = capture.original = CacheSpy(capture.original)
    prompt_ids, sequences = trl_generate(trainer)
    gc.collect()
    assert len(spy.caches) == 1 and spy.caches[0]() is None  # generate's padded cache is gone
    generated = capture.generated
    eos = set(trainer.eos_token_ids)
    for ids, completion, row in zip(prompt_ids, generated.completions, generated.caches):
        response = strip_eos(completion, eos)
        assert row.ids == list(ids) + response
        for keys, values in row.layers:
            # each row's own columns only: no left padding, nothing past its EOS
            assert keys.shape[2] == values.shape[2] == len(ids) + len(response)
            assert keys.untyped_storage().nbytes() == keys.numel() * keys.element_size()
    assert len({len(ids) for ids in prompt_ids}) > 1  # the shorter prompts were padded


def live_keys(rows: list[ContextCache]) -> list:
    return [weakref.ref(keys) for row in rows for keys, _ in row.layers]


@pytest.mark.parametrize("path", ["taken", "other_ids", "next_generate"])
def test_kept_keys_and_values_never_outlive_their_step(path, tmp_path):
    """Handed over once and freed with the taker's groups; dropped when a call's rows are not
    the generated ones; dropped when the next generate call begins."""
    reward = CovoReward("covo_paper")
    trainer = trainer_with(reward, tmp_path)
    capture = reward.capture
    prompt_ids, _ = trl_generate(trainer)
    refs = live_keys(capture.generated.caches)
    completions = [list(c) for c in capture.generated.completions]
    eos = set(trainer.eos_token_ids)
    if path == "taken":
        responses = [strip_eos(c, eos) for c in completions]
        stats, caches = capture.take(prompt_ids, completions, responses, keep_cache=True)
        assert all(c is not None for c in caches)
        del caches
    elif path == "other_ids":
        completions[0] = [completions[0][0] + 1, *completions[0][1:]]
        responses = [strip_eos(c, eos) for c in completions]
        assert capture.take(prompt_ids, completions, responses, keep_cache=True) is None
    else:
        trl_generate(trainer)
    gc.collect()
    assert refs and all(ref() is None for ref in refs)


def test_statistics_only_keeps_no_keys_and_values(tmp_path):
    reward = CovoReward("covo_paper", ["capture_cache=none"])
    trainer = trainer_with(reward, tmp_path)
    prompt_ids, _ = trl_generate(trainer)
    generated = reward.capture.generated
    assert generated.caches is None
    responses = [strip_eos(c, set(trainer.eos_token_ids)) for c in generated.completions]
    stats, caches = reward.capture.take(prompt_ids, generated.completions, responses, True)
    assert caches is None and [len(row["entropy"]) for row in stats] == list(map(len, responses))


def test_nothing_is_captured_while_trl_runs_tools(tmp_path):
    reward = CovoReward("covo_paper")
    trainer = trainer_with(reward, tmp_path)
    trl_generate(trainer)
    assert reward.capture.generated is not None
    trl_generate(trainer, tools=[lambda x: x])  # TRL calls generate once per turn then
    assert reward.capture.generated is None


class Judge:
    """Stands in for a reward's judge: at each group it judges, the keys and values of how
    many trajectories are alive in the process."""

    def __init__(self, inner):
        self.inner, self.alive, self.kept = inner, [], []

    def __call__(self, group, scorer):
        gc.collect()
        self.alive.append(sum(type(o) is ContextCache for o in gc.get_objects()))
        self.kept.append(sum(c is not None for c in group.context_caches))
        return self.inner(group, scorer)


def test_groups_are_built_scored_and_freed_one_at_a_time(tmp_path):
    """The batched forward (the path of every vLLM run): when the first group is judged, the
    keys and values alive are that group's only."""
    reward = CovoReward("covo_paper")
    trainer = trainer_with(reward, tmp_path)
    judge = reward.reward = Judge(reward.reward)
    inputs, prompts, completions, ids = trl_rows(trainer.processing_class)
    gc.collect()
    before = sum(type(o) is ContextCache for o in gc.get_objects())
    reward(prompts=prompts, completions=completions, completion_ids=ids)
    assert judge.kept == [N, N]  # every trajectory's keys and values reach the scorer
    assert [alive - before for alive in judge.alive] == [N, N]


def test_the_trainer_is_freed_and_generate_given_back(tmp_path):
    loaded = build_tiny()
    model = loaded.model
    reward = CovoReward("covo")
    trainer = trainer_with(reward, tmp_path, loaded, max_steps=1)
    assert model.generate is reward.capture
    twin = copy.deepcopy(model)  # a copy of the model is not a copy of the trainer
    assert twin.generate.trainer is trainer
    trainer.train()
    assert "generate" not in model.__dict__  # given back when training ends
    ref = weakref.ref(trainer)
    del trainer
    gc.collect()
    assert ref() is None and reward.trainer is None
