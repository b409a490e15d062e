"""The rollout's log-prob forward and the keys and values it keeps for scoring."""

from __future__ import annotations

import random

import torch

from covo.models.loading import build_tiny
from covo.rewards.covo.scorer import NaiveScorer, PrefixSharedScorer
from covo.rollout.context_cache import cache_of
from covo.rollout.engine import Generation
from covo.rollout.sampling import build_rollout, format_prompts


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
            alone = cache_of(loaded.model(torch.tensor([ids]), use_cache=True))
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


def test_logprobs_at_temperature_match_an_unpadded_forward():
    loaded = build_tiny(seed=3)
    prompts = ["What is 2 + 2?", "Compute 17 * 3 - 5 and give the result as a number."]
    torch.manual_seed(1)
    rollout = build_rollout(
        loaded.model,
        loaded.tokenizer,
        format_prompts(loaded.tokenizer, prompts, chat_template=True),
        num_samples=2,
        max_new_tokens=16,
        temperature=0.7,
        top_p=1.0,
        stats_chunk=3,
    )
    for r, response in enumerate(rollout.response_ids):
        ended = not rollout.truncated[r]
        ids = rollout.prompt_ids[r // 2] + response + ([loaded.tokenizer.eos_token_id] * ended)
        with torch.no_grad():
            logits = loaded.model(torch.tensor([ids])).logits[0] / 0.7
        p = len(rollout.prompt_ids[r // 2])
        # token t is predicted at position t - 1; sampling divides the logits by T
        want = torch.log_softmax(logits[p - 1 : -1], -1).gather(-1, torch.tensor(ids[p:])[:, None])
        probs = torch.softmax(logits[p - 1 : -1], -1)
        n = len(ids) - p
        torch.testing.assert_close(rollout.logprobs[r, :n], want[:, 0], atol=1e-5, rtol=1e-5)
        entropy = -(probs * probs.log()).sum(-1)
        torch.testing.assert_close(rollout.entropy[r, :n], entropy, atol=1e-5, rtol=1e-5)
        assert (rollout.logprobs[r, n:] == 0).all()


def test_masks_truncation_and_eos_on_a_model_forced_to_stop():
    """Generation replaced by fixed tokens: row 0 stops after 2 tokens, row 1 after 4
    (pad == EOS, as for SmolLM2, so EOS also fills the padding), row 2 never stops."""
    loaded = build_tiny(seed=3)
    tok = loaded.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert eos == pad
    prompt = format_prompts(tok, ["What is 2 + 2?"], chat_template=True)
    words = tok.encode("12 + 7 = 19", add_special_tokens=False)[:5]
    rows = [words[:2] + [eos, pad, pad, pad], words[:4] + [eos, pad], words[:5] + [words[0]]]

    def forced(model, tokenizer, encoded, num_samples, *args, **kwargs):
        ids = encoded["input_ids"].repeat(3, 1)
        sequences = torch.cat([ids, torch.tensor(rows)], dim=1)
        return Generation(sequences, encoded["attention_mask"].repeat(3, 1))  # no statistics

    rollout = build_rollout(loaded.model, tok, prompt, 3, 6, 1.0, 1.0, engine=forced)
    assert rollout.response_mask.tolist() == [
        [1, 1, 1, 0, 0, 0],  # the first EOS counts, what follows is padding
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ]
    assert rollout.truncated.tolist() == [False, False, True]
    assert rollout.response_ids == [words[:2], words[:4], words[:5] + [words[0]]]
    assert rollout.texts[0] == tok.decode(words[:2])
    assert (rollout.logprobs[0, 3:] == 0).all() and (rollout.logprobs[0, :3] < 0).all()
    assert (rollout.entropy[1, 5:] == 0).all() and (rollout.entropy[1, :5] > 0).all()
    prompt_len = rollout.prompt_len
    assert rollout.attention_mask[0, prompt_len:].tolist() == [1, 1, 1, 0, 0, 0]
