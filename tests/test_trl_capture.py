"""Statistics, and keys and values, from TRL's own generate call: the rewards, logged values
and per-token statistics of the batched forward, the sequences TRL sees unchanged, and the
batched forward wherever the capture cannot prove the rows its own."""

from __future__ import annotations

import pytest
import torch
from conftest import GROUPS_OF_FOUR
from test_trl_integration import N, adapted_tiny, oracle_group, trainer_with

pytest.importorskip("trl")
from covo.integrations.trl import CovoReward  # noqa: E402
from covo.integrations.trl.reward import inference, strip_eos  # noqa: E402
from covo.models import lora  # noqa: E402
from covo.models.loading import build_tiny  # noqa: E402
from covo.rewards.covo.reward import encode  # noqa: E402
from covo.rollout.context_cache import cache_of
from covo.rollout.groups import STAT_FIELDS  # noqa: E402

torch.set_num_threads(1)
LOGGED = ("train/entropy", "rollout/self_certainty", "reward/mean")


def boxed_bias(tokenizer) -> dict:
    """`sequence_bias` that makes the random tiny model write `\\boxed{1}` and `\\boxed{7}`, so
    CoVo finds answers and its scorer runs; it changes the scores generate samples from, not
    the raw logits the statistics read."""
    backslash, boxed, brace, _, close = encode(tokenizer, "\\boxed{7}")
    digits = [encode(tokenizer, d)[0] for d in ("1", "7")]
    bias = {(backslash,): 3.0, (backslash, boxed): 30.0, (boxed, brace): 30.0}
    bias |= {(brace, d): 15.0 for d in digits} | {(d, close): 30.0 for d in digits}
    return bias


class BothPaths:
    """Stands in TRL's reward list for `reward`: each call judges the rows with the capture,
    then with the capture off (the batched forward), and computes the float64 oracle of
    `oracle_group`, all at the same weights; TRL gets the capture's rewards. Each path also
    records the (rows, columns) of every input the policy's body was fed (a forward hook).
    `alter` changes one captured completion id first."""

    def __init__(self, reward: CovoReward, alter: bool = False):
        self.reward, self.alter, self.calls = reward, alter, []
        self.__name__ = reward.__name__

    def __call__(self, log_metric=None, **kwargs):
        runs = {}
        judge, capture = self.reward.reward, self.reward.capture
        if self.alter:
            capture.generated.completions[0][0] += 1
        trainer = self.reward.trainer
        body = lora.base_of(trainer.accelerator.unwrap_model(trainer.model)).base_model
        for path in ("capture", "fallback"):
            logged, seen, fed = {}, [], []
            self.reward.reward = lambda group, scorer, seen=seen: (
                seen.append(group) or judge(group, scorer)
            )
            self.reward.capture = capture if path == "capture" else None
            hook = body.register_forward_pre_hook(
                lambda module, args, kw, fed=fed: fed.append(tuple(kw["input_ids"].shape)),
                with_kwargs=True,
            )
            rewards = self.reward(log_metric=logged.__setitem__, **kwargs)
            hook.remove()
            runs[path] = (rewards, logged, seen, fed)
        self.reward.reward, self.reward.capture = judge, capture
        runs["oracle"] = self.oracle(runs["capture"][2], kwargs["completion_ids"])
        self.calls.append(runs)
        for name, value in runs["capture"][1].items():
            log_metric(name, value)
        return runs["capture"][0]

    def oracle(self, groups, completion_ids) -> list:
        trainer = self.reward.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        eos, out = set(trainer.eos_token_ids), []
        with inference(model):
            for g, group in enumerate(groups):
                responses = [strip_eos(ids, eos) for ids in completion_ids[g * N : (g + 1) * N]]
                assert responses == group.response_ids
                args = (group.prompt_ids, responses, group.texts, trainer.temperature)
                out.append(oracle_group(model, *args))
        return out


def step_through_trl(name: str, tmp_path, temperature: float, loaded=None, alter=False):
    """One GRPOTrainer step with `name` seen through `BothPaths`; its calls."""
    loaded = loaded or build_tiny()
    reward = CovoReward(name)
    bias = {"sequence_bias": boxed_bias(loaded.tokenizer)}
    trainer = trainer_with(
        reward, tmp_path, loaded, temperature=temperature, max_steps=1, generation_kwargs=bias
    )
    both = trainer.reward_funcs[0] = BothPaths(reward, alter)
    trainer.train()
    assert len(both.calls) == 1
    return both.calls


def assert_same_groups(got, expected) -> None:
    for a, b in zip(got, expected, strict=True):
        for field in STAT_FIELDS:
            for x, y in zip(getattr(a, field), getattr(b, field), strict=True):
                assert x.shape == y.shape
                assert torch.allclose(x, y, atol=1e-5, rtol=0), field


@pytest.mark.parametrize("name", ["self_certainty", "entropy", "seq_logprob", "covo_paper"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_statistics_from_generate_equal_the_batched_forward(name, temperature, tmp_path):
    """Through a real GRPOTrainer step: the capture ran, and its rewards, logged statistics
    and per-token statistics equal the batched forward's (1e-5) and the test's own float64
    forward over prompt + completion; covo_paper's scorer read the kept keys and values."""
    [call] = step_through_trl(name, tmp_path, temperature)
    (got, logged, groups, fed), (expected, fallback_logged, fallback_groups, fallback_fed) = (
        call["capture"],
        call["fallback"],
    )
    # no batched statistics pass ran on the capture's path: the body was fed nothing (CoVo's
    # scorer: one packed row at a time); the fallback fed a group's completions together
    assert max((rows for rows, _ in fed), default=0) <= 1
    assert bool(fed) == (name == "covo_paper")
    assert max(rows for rows, _ in fallback_fed) == N
    assert logged["perf/stats_from_generate"] == 1.0
    assert fallback_logged["perf/stats_from_generate"] == 0.0
    assert got == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) > 1
    for key in LOGGED:
        assert logged[key] == pytest.approx(fallback_logged[key], abs=1e-5), key
    assert_same_groups(groups, fallback_groups)
    assert_same_groups(groups, call["oracle"])
    if name == "covo_paper":
        assert logged["reward/answered_frac"] > 0
        assert logged["perf/scoring_reused_tokens"] > 0  # the kept keys and values were read
        assert logged["perf/scoring_tokens"] == fallback_logged["perf/scoring_tokens"]


def test_a_capture_of_other_ids_falls_back(tmp_path):
    [call] = step_through_trl("self_certainty", tmp_path, 1.0, alter=True)
    (got, logged, groups, fed), (expected, _, fallback_groups, _) = (
        call["capture"],
        call["fallback"],
    )
    assert logged["perf/stats_from_generate"] == 0.0
    assert max(rows for rows, _ in fed) == N  # the batched pass ran
    assert got == expected
    assert_same_groups(groups, fallback_groups)
    assert_same_groups(groups, call["oracle"])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_under_peft_the_capture_runs_unless_dropout_is_on(dropout, tmp_path):
    """LoRA adapters (B random): the adapted policy's statistics from generate; with LoRA
    dropout on, TRL samples with units dropped, so the batched forward (eval mode) is used."""
    adapted = adapted_tiny(dropout)
    [call] = step_through_trl("self_certainty", tmp_path, 0.7, adapted)
    (got, logged, groups, fed), (expected, _, fallback_groups, _) = (
        call["capture"],
        call["fallback"],
    )
    assert logged["perf/stats_from_generate"] == float(dropout == 0.0)
    assert (fed == []) == (dropout == 0.0)  # with dropout on, the batched pass ran
    assert got == pytest.approx(expected, abs=1e-5)
    assert_same_groups(groups, fallback_groups)
    assert_same_groups(groups, call["oracle"])


def test_generate_returns_the_same_sequences_and_the_true_keys_and_values(tmp_path):
    """The wrapped generate returns TRL the tensor the model's own returns (same seed), once
    wrapped however often bound, and removable; the kept keys and values of each row's prompt
    + response (left padding sliced off) are those of one forward over them (1e-5)."""
    reward = CovoReward("covo_paper")
    trainer = trainer_with(reward, tmp_path)
    model, capture = trainer.model, reward.capture
    other = CovoReward("covo")
    trainer.reward_funcs.append(other)
    reward.bind(trainer)
    other.bind(trainer)
    assert model.generate is capture and other.capture is capture
    assert not isinstance(capture.original, type(capture))
    texts = [item["prompt"] for item in GROUPS_OF_FOUR]
    texts.append("What is 12 + 7 when you add them and then some more words?")
    prompts = [[{"role": "user", "content": text}] for text in texts]
    prompt_ids = trainer._tokenize_prompts(prompts)[0]
    assert len({len(ids) for ids in prompt_ids}) > 1  # the shorter prompt is left-padded
    width, pad = max(map(len, prompt_ids)), trainer.processing_class.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in prompt_ids])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids])
    inputs = dict(input_ids=input_ids, attention_mask=mask)

    torch.manual_seed(0)
    wrapped = model.generate(**inputs, generation_config=trainer.generation_config)
    generated = capture.generated
    capture.remove()
    assert "generate" not in model.__dict__
    torch.manual_seed(0)
    plain = model.generate(**inputs, generation_config=trainer.generation_config)
    assert isinstance(wrapped, torch.Tensor) and torch.equal(wrapped, plain)

    capture.generated = generated
    eos = set(trainer.eos_token_ids)
    responses = [strip_eos(ids, eos) for ids in generated.completions]
    stats, caches = capture.take(prompt_ids, generated.completions, responses, keep_cache=True)
    again = capture.take(prompt_ids, generated.completions, responses, True)
    assert again[1] is None  # the keys and values are handed once; the statistics stay
    assert [row["entropy"].tolist() for row in again[0]] == [
        row["entropy"].tolist() for row in stats
    ]
    model.eval()
    for ids, response, row, context in zip(prompt_ids, responses, stats, caches):
        [oracle] = [oracle_group(model, list(ids), [response], [""], trainer.temperature)]
        for field, stat in STAT_FIELDS.items():
            assert torch.allclose(row[stat], getattr(oracle, field)[0], atol=1e-5, rtol=0)
        assert context.ids == list(ids) + response
        with torch.no_grad():
            full = cache_of(model(input_ids=torch.tensor([context.ids]), use_cache=True))
        for (keys, values), layer in zip(context.layers, full.layers, strict=True):
            assert torch.allclose(keys, layer.keys, atol=1e-5, rtol=0)
            assert torch.allclose(values, layer.values, atol=1e-5, rtol=0)
