"""The one-pass rollout (statistics collected while decoding, keys and values from decoding),
the chosen-token log-prob used by the update, and the static-cache engine."""

from __future__ import annotations

import logging

import pytest
import torch

from covo.models.loading import build_tiny
from covo.rollout.context_cache import CACHE_NAME, cache_of
from covo.rollout.engine import HFGenerate
from covo.rollout.sampling import (
    batched_token_stats,
    build_rollout,
    chosen_logprobs,
    format_prompts,
)

PROMPTS = ["What is 2 + 2?", "Compute 17 * 3 - 5 and give the result as a number."]
STATS = ("logprobs", "entropy", "self_certainty")


def stopping_tiny():
    """The tiny model with its EOS logit raised: some rows stop, others are cut."""
    loaded = build_tiny(seed=5)
    bias = torch.zeros(loaded.model.config.vocab_size)
    bias[loaded.tokenizer.eos_token_id] = 2.0
    loaded.model.lm_head.register_forward_hook(lambda module, args, out: out + bias.to(out.dtype))
    return loaded


def sample(loaded, temperature, one_pass, engine=None, seed=0, keep_cache=False, tokens=20):
    torch.manual_seed(seed)
    return build_rollout(
        loaded.model,
        loaded.tokenizer,
        format_prompts(loaded.tokenizer, PROMPTS, chat_template=True),
        num_samples=3 if temperature > 0 else 1,  # greedy gives one sample per prompt
        max_new_tokens=tokens,
        temperature=temperature,
        top_p=1.0,
        stats_chunk=4,
        keep_cache=keep_cache,
        engine=engine,
        one_pass=one_pass,
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_one_pass_statistics_equal_the_two_pass_forward(temperature):
    # greedy decoding of the EOS-raised model stops at once: the plain one runs to the limit
    loaded = stopping_tiny() if temperature > 0 else build_tiny(seed=5)
    one = sample(loaded, temperature, one_pass=True)
    two = sample(loaded, temperature, one_pass=False)
    # collecting statistics draws nothing from the generator: the very same samples
    assert torch.equal(one.sequences, two.sequences)
    assert torch.equal(one.response_mask, two.response_mask)
    if temperature > 0:  # both stopped and cut rows are checked
        assert one.truncated.any() and not one.truncated.all()
    for name in STATS:
        got, want = getattr(one, name), getattr(two, name)
        assert (got - want).abs().max() <= 1e-4, name
        assert (got[one.response_mask == 0] == 0).all()
    # self-certainty is KL(uniform || p) at the sampling temperature, from an unpadded forward
    r = max(range(len(one.response_ids)), key=lambda row: len(one.response_ids[row]))
    prompt = one.prompt_ids[r // one.group_size]
    ids = prompt + one.response_ids[r]
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids])).logits[0].double()
    p = len(prompt)
    logp = torch.log_softmax(logits[p - 1 : -1] / (temperature or 1.0), -1)
    want = -logp.mean(-1) - torch.log(torch.tensor(float(logits.shape[-1]), dtype=torch.double))
    n = len(one.response_ids[r])
    assert (one.self_certainty[r, :n].double() - want).abs().max() <= 1e-4


def test_logprobs_of_chosen_tokens_and_their_gradient_equal_the_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64) * 4
    targets = torch.randint(0, 11, (3, 5))
    weights = torch.randn(3, 5, dtype=torch.float64)
    for temperature in (1.0, 0.7):
        mine = logits.float().clone().requires_grad_(True)
        # chunks of 4 positions: 15 positions end in a partial chunk
        (chosen_logprobs(mine, targets, temperature, chunk=4) * weights.float()).sum().backward()
        naive = logits.clone().requires_grad_(True)
        logp = torch.log_softmax(naive / temperature, -1).gather(-1, targets[..., None])[..., 0]
        (logp * weights).sum().backward()
        got = chosen_logprobs(logits.float(), targets, temperature, chunk=4)
        assert (got.double() - logp.detach()).abs().max() <= 1e-5
        assert (mine.grad.double() - naive.grad).abs().max() <= 1e-5
    # bf16 logits (autocast's lm_head output): float32 log-probs, a bf16 gradient
    low = logits.bfloat16().requires_grad_(True)
    chosen_logprobs(low, targets, 0.7).sum().backward()
    assert low.grad.dtype == torch.bfloat16
    exact = logits.bfloat16().double().requires_grad_(True)
    torch.log_softmax(exact / 0.7, -1).gather(-1, targets[..., None]).sum().backward()
    assert (low.grad.double() - exact.grad).abs().max() <= 2e-2


def test_static_cache_engine_matches_the_dynamic_one():
    loaded = stopping_tiny()
    static = HFGenerate(cache="static")
    greedy = sample(loaded, 0.0, True, engine=static)
    assert torch.equal(greedy.sequences, sample(loaded, 0.0, True).sequences)
    assert not static.fell_back
    # sampled tokens: the statistics collected with a static cache equal a forward's
    rollout = sample(loaded, 1.0, True, engine=static, seed=3, keep_cache=True)
    mask = rollout.attention_mask
    forward, _ = batched_token_stats(
        loaded.model, rollout.sequences, mask, rollout.response_mask.shape[1], 1.0, 6
    )
    for name in STATS:
        got = getattr(rollout, name)
        assert (got - forward[name] * rollout.response_mask).abs().max() <= 1e-4, name
    # the static cache's keys are those of each trajectory fed alone
    for cache in rollout.context_caches:
        with torch.no_grad():
            alone = cache_of(loaded.model(torch.tensor([cache.ids]), use_cache=True))
        for (k, v), layer in zip(cache.layers, alone.layers):
            assert k.shape == layer.keys.shape
            assert (k - layer.keys).abs().max() <= 1e-5
            assert (v - layer.values).abs().max() <= 1e-5


def test_static_engine_falls_back_with_one_line(caplog, monkeypatch):
    from torch._dynamo.exc import InternalTorchDynamoError

    loaded = build_tiny(seed=5)
    original = loaded.model.generate

    def no_static(**kwargs):
        if CACHE_NAME in kwargs:  # the static cache passed in
            raise InternalTorchDynamoError("static cache unsupported\nsecond line")
        return original(**kwargs)

    monkeypatch.setattr(loaded.model, "generate", no_static)
    engine = HFGenerate(cache="static", compile=True)
    with caplog.at_level(logging.WARNING, logger="covo.rollout.engine"):
        got = sample(loaded, 1.0, True, engine=engine, seed=2)
        again = sample(loaded, 1.0, True, engine=engine, seed=2)
    want = sample(loaded, 1.0, True, seed=2)
    assert engine.fell_back
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "static cache + compile failed here" in lines[0]
    assert "second line" not in lines[0]
    for rollout in (got, again):
        assert torch.equal(rollout.sequences, want.sequences)
        assert torch.allclose(rollout.logprobs, want.logprobs, atol=1e-6)


def test_unknown_cache_kind_is_refused():
    with pytest.raises(ValueError, match="rollout.engine.cache"):
        HFGenerate(cache="paged")
