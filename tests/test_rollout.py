"""The rollout's log-prob forward and the keys and values it keeps for scoring."""

from __future__ import annotations

import random

import torch

from covo.model import build_tiny
from covo.rollout import build_rollout, format_prompts
from covo.scoring import NaiveScorer, PrefixSharedScorer


def tiny_rollout(keep_cache: bool, attn: str = "sdpa"):
    loaded = build_tiny(seed=3, attn_implementation=attn)
    # prompts of different lengths: the shorter one is left-padded in the batch
    prompts = ["What is 2 + 2?", "Compute 17 * 3 - 5 and give the result as a number."]
    torch.manual_seed(0)
    rollout = build_rollout(
        loaded.model,
        loaded.tokenizer,
        format_prompts(loaded.tokenizer, prompts, chat_template=True),
        num_samples=3,
        max_new_tokens=20,
        temperature=1.0,
        top_p=1.0,
        stats_chunk=4,  # chunks of 4 and 2 rows: caches come from two forwards
        keep_cache=keep_cache,
    )
    return loaded, rollout


def test_kept_caches_match_each_unpadded_trajectory():
    loaded, rollout = tiny_rollout(keep_cache=True)
    lengths = {len(p) for p in rollout.prompt_ids}
    assert len(lengths) == 2  # the batch really is left-padded
    assert len(rollout.context_caches) == 6
    layers = loaded.model.config.num_hidden_layers
    for r, cache in enumerate(rollout.context_caches):
        ids = rollout.prompt_ids[r // 3] + rollout.response_ids[r]
        assert cache.ids == ids
        assert len(cache.layers) == layers
        assert all(k.shape[2] == v.shape[2] == len(ids) for k, v in cache.layers)
        # keys and values equal those of a forward over the trajectory alone
        with torch.no_grad():
            alone = loaded.model(torch.tensor([ids]), use_cache=True).cache
        for (k, v), layer in zip(cache.layers, alone.layers):
            assert (k - layer.keys).abs().max() <= 1e-5
            assert (v - layer.values).abs().max() <= 1e-5
    # the groups hand each response its cache
    groups = rollout.groups([None, None])
    assert groups[1].context_caches[2] is rollout.context_caches[5]
    _, plain = tiny_rollout(keep_cache=False)
    assert plain.context_caches is None and plain.groups([None, None])[0].context_caches is None
    assert torch.equal(plain.sequences, rollout.sequences)
    assert torch.allclose(plain.logprobs, rollout.logprobs, atol=1e-6)


def test_scoring_from_rollout_caches_equals_naive():
    loaded, rollout = tiny_rollout(keep_cache=True, attn="eager")
    rng = random.Random(0)
    template = loaded.tokenizer.encode("The answer is: \\boxed{", add_special_tokens=False)
    answers = [loaded.tokenizer.encode(f"{a}}}", add_special_tokens=False) for a in (4, 46, 5)]
    for r, cache in enumerate(rollout.context_caches):
        prompt_len = len(rollout.prompt_ids[r // 3])
        context = cache.ids
        inside = sorted(rng.sample(range(prompt_len + 1, len(context)), 2))
        ends = [prompt_len, *inside, len(context)]
        branches = [[template + a for a in answers] for _ in ends]
        starts = [[rng.choice([0, len(template)]) for _ in answers] for _ in ends]
        shared, naive = PrefixSharedScorer(loaded.model, None), NaiveScorer(loaded.model, None)
        got = shared.branch_nll(context, ends, branches, starts, context_cache=cache)
        want = naive.branch_nll(context, ends, branches, starts)
        assert max((g - w).abs().max().item() for g, w in zip(got, want)) <= 1e-4
        assert shared.reused_tokens == len(context)
        assert shared.tokens_processed < shared.floor_tokens - len(context) + len(ends) + 1
