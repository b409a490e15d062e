from __future__ import annotations

import random
import warnings
from unittest.mock import PropertyMock, patch

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from covo.rewards.covo.scorer import NaiveScorer, PrefixSharedScorer, pack_trie, trie_size
from covo.rollout.context_cache import ContextCache, cache_of, split_cache

torch.set_num_threads(1)
VOCAB = 97
TEMPLATE = [5, 6, 7]


def tiny_llama(attn: str = "sdpa") -> LlamaForCausalLM:
    # a wide init makes the logits depend strongly on the context, so a mask or position
    # error shows up far above the 1e-4 tolerance
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def random_case(seed: int = 1):
    """40 context tokens (prompt of 10), 5 states incl. one at the prompt end and one at the
    context end; 1 or 3 branches per state = template + tails of 1-4 tokens."""
    rng = random.Random(seed)
    context = [rng.randrange(VOCAB) for _ in range(40)]
    ends = [10, *sorted(rng.sample(range(11, 40), 3)), 40]
    branches, scored_from = [], []
    for i in range(len(ends)):
        first = [rng.randrange(VOCAB)]
        # the second tail extends the first: tries must share tails too, not only the template
        tails = [first, first + [rng.randrange(VOCAB)], [rng.randrange(VOCAB) for _ in range(4)]]
        k = 1 if i % 2 else 3
        branches.append([TEMPLATE + t for t in tails[:k]])
        scored_from.append([rng.choice([0, len(TEMPLATE)]) for _ in range(k)])
    return context, ends, branches, scored_from


# context [10, 11, 12, 13]; state 0 ends at 2 with branches [5, 6], [5, 7]; state 1 ends at 4
# with branch [8]; the second branch of state 0 is scored from its token 1
HAND = ([10, 11, 12, 13], [2, 4], [[[5, 6], [5, 7]], [[8]]], [[0, 1], [0]])


def test_pack_trie_hand_case():
    packed = pack_trie(*HAND)
    # state 0's trie is 5 -> {6, 7}: node 5 once at index 4, then 6, 7; state 1's node 8
    assert packed.input_ids.tolist() == [10, 11, 12, 13, 5, 6, 7, 8]
    # branch token j after boundary b sits at position b + j
    assert packed.position_ids.tolist() == [0, 1, 2, 3, 2, 3, 3, 4]
    expected = [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0],  # 5: context[:2] and itself
        [1, 1, 0, 0, 1, 1, 0, 0],  # 6: context[:2], 5, itself; not its sibling 7
        [1, 1, 0, 0, 1, 0, 1, 0],
        [1, 1, 1, 1, 0, 0, 0, 1],  # 8: context[:4], none of state 0's trie
    ]
    assert packed.allowed.int().tolist() == expected
    # 5 from context[1]; 6 and 7 from node 5 (index 4); 8 from context[3]
    assert packed.logit_pos.tolist() == [1, 4, 4, 3]
    assert packed.targets.tolist() == [5, 6, 7, 8]
    assert packed.owner.tolist() == [0, 0, 1, 2]


def test_pack_trie_cached_context_hand_case():
    packed = pack_trie(*HAND, context_cached=True)
    # state 0 scores its first branch token: its last context token 11 is fed again (a root at
    # position 1); state 1 likewise re-feeds 13 at position 3; the context itself is not fed
    assert packed.input_ids.tolist() == [11, 5, 6, 7, 13, 8]
    assert packed.position_ids.tolist() == [1, 2, 3, 3, 3, 4]
    # columns: the 4 cached context tokens, then the 6 fed tokens
    expected = [
        [1, 0, 0, 0, 1, 0, 0, 0, 0, 0],  # root 11: context[:1] and itself
        [1, 1, 0, 0, 0, 1, 0, 0, 0, 0],  # 5: context[:2] (cached 11 included) and itself
        [1, 1, 0, 0, 0, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 0, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 1, 0],  # root 13: context[:3] and itself
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 1],
    ]
    assert packed.allowed.int().tolist() == expected
    assert packed.logit_pos.tolist() == [0, 1, 1, 4]
    assert packed.targets.tolist() == [5, 6, 7, 8]
    # no branch scores its first token: no root
    none_first = pack_trie(HAND[0], HAND[1], HAND[2], [[1, 1], [0]], context_cached=True)
    assert none_first.input_ids.tolist() == [5, 6, 7, 13, 8]


def left_padded_caches(model, contexts: list[list[int]], pad: int = 0) -> list[ContextCache]:
    """Keys and values of `contexts` from one left-padded batched forward, as a rollout's
    log-prob pass computes them (positions counted from each row's first real token)."""
    width = max(map(len, contexts))
    ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts])
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    return split_cache(cache_of(out), [(c, width - len(c)) for c in contexts])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_context_equals_naive(attn):
    model = tiny_llama(attn)
    cases = [random_case(seed) for seed in (4, 5)]
    short = cases[1][0][:33]  # a shorter row in the batch: left padding in front of it
    cases[1] = (short, [10, 20, 33], cases[1][2][:3], cases[1][3][:3])
    caches = left_padded_caches(model, [cases[0][0], short])
    for case, cache in zip(cases, caches):
        reused, naive = PrefixSharedScorer(model, None), NaiveScorer(model, None)
        got = reused.branch_nll(*case, context_cache=cache)
        want = naive.branch_nll(*case, context_cache=cache)
        diff = max((g - w).abs().max().item() for g, w in zip(got, want))
        assert diff <= 1e-4
        context, ends, branches, starts = case
        nodes = sum(trie_size(bs) for bs in branches)
        roots = sum(0 in s for s in starts)
        assert roots >= 2
        assert reused.tokens_processed == nodes + roots
        assert reused.reused_tokens == ends[-1] == len(context)
        assert reused.floor_tokens == naive.floor_tokens == ends[-1] + nodes
        assert naive.reused_tokens == 0


def test_cached_context_split_states_and_bad_cache():
    model = tiny_llama()
    case = random_case(seed=6)
    (cache,) = left_padded_caches(model, [case[0]])
    whole = PrefixSharedScorer(model, None).branch_nll(*case)
    split = PrefixSharedScorer(model, None, states_per_forward=2)
    got = split.branch_nll(*case, context_cache=cache)
    assert max((g - w).abs().max().item() for g, w in zip(got, whole)) <= 1e-4
    # every forward reads its context from the cache: nothing is fed twice
    assert split.reused_tokens == case[1][1] + case[1][3] + case[1][4]
    other = [(t + 1) % VOCAB for t in case[0]]
    with pytest.raises(ValueError, match="context_cache does not hold the first 40"):
        split.branch_nll(other, *case[1:], context_cache=cache)
    (short,) = left_padded_caches(model, [case[0][:30]])
    with pytest.raises(ValueError, match="context_cache"):
        split.branch_nll(*case, context_cache=short)


def test_single_token_branch_is_plain_next_token_nll():
    model = tiny_llama()
    context = [3, 14, 15, 92, 65]
    want = -model(torch.tensor([context])).logits[0, -1].log_softmax(-1)[35]
    for scorer in (PrefixSharedScorer(model, None), NaiveScorer(model, None)):
        (got,) = scorer.branch_nll(context, [5], [[[35]]], [[0]])
        assert got.shape == (1,) and got.dtype == torch.float32
        assert got.item() == pytest.approx(want.item(), abs=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_equals_naive(attn):
    model = tiny_llama(attn)
    case = random_case()
    shared, naive = PrefixSharedScorer(model, None), NaiveScorer(model, None)
    got, want = shared.branch_nll(*case), naive.branch_nll(*case)
    assert [g.shape for g in got] == [(len(bs),) for bs in case[2]]
    diff = max((g - w).abs().max().item() for g, w in zip(got, want))
    assert diff <= 1e-4
    # the case is sensitive to context: the same branch after different states differs
    assert abs(want[0][0] - want[-1][0]) > 1e-2
    assert shared.tokens_processed == shared.floor_tokens == naive.floor_tokens
    assert naive.tokens_processed > 3 * shared.tokens_processed


def test_token_counts_hand_case():
    model = tiny_llama()
    shared, naive = PrefixSharedScorer(model, None), NaiveScorer(model, None)
    shared.branch_nll(*HAND)
    naive.branch_nll(*HAND)
    # floor: 4 context tokens + trie nodes {5, 56, 57} + {8} = 8, all in one forward
    assert shared.floor_tokens == shared.tokens_processed == 8
    # naive: state 0 feeds 2 rows of 2 + 2, state 1 one row of 4 + 1: 8 + 5 = 13
    assert naive.tokens_processed == 13
    shared.reset_counters()
    assert shared.tokens_processed == shared.floor_tokens == 0


def test_states_per_forward_refeeds_context():
    model = tiny_llama()
    case = random_case(seed=2)
    one = PrefixSharedScorer(model, None).branch_nll(*case)
    split = PrefixSharedScorer(model, None, chunk_size=2, states_per_forward=2)
    got = split.branch_nll(*case)
    assert max((g - w).abs().max().item() for g, w in zip(got, one)) <= 1e-4
    context, ends, branches, _ = case
    nodes = [len({tuple(b[:j]) for b in bs for j in range(1, len(b) + 1)}) for bs in branches]
    # states {0, 1}, {2, 3}, {4}: each forward feeds the context up to its last state
    refed = ends[1] + ends[3] + ends[4]
    assert split.tokens_processed == refed + sum(nodes)
    assert split.floor_tokens == ends[4] + sum(nodes)


def test_bf16_scoring_stays_close_to_fp32():
    model = tiny_llama()
    case = random_case(seed=3)
    fp32 = NaiveScorer(model, None).branch_nll(*case)
    for scorer in (
        PrefixSharedScorer(model, None, torch.bfloat16),
        NaiveScorer(model, None, torch.bfloat16),
    ):
        got = scorer.branch_nll(*case)
        diff = max((g - w).abs().max().item() for g, w in zip(got, fp32))
        assert 0 < diff < 0.1


def test_empty_state_and_bad_inputs():
    model = tiny_llama()
    shared = PrefixSharedScorer(model, None)
    got = shared.branch_nll([1, 2, 3], [2, 3], [[], [[4, 5]]], [[], [1]])
    assert got[0].shape == (0,) and got[1].shape == (1,)
    with pytest.raises(ValueError, match="state end"):
        shared.branch_nll([1, 2, 3], [0], [[[4]]], [[0]])
    with pytest.raises(ValueError, match="nothing to score"):
        shared.branch_nll([1, 2, 3], [3], [[[4]]], [[1]])


def matmul_dtypes(model, scorer, case, enclosing: torch.dtype | None = None) -> set:
    """The dtypes the model's query projections computed in while `scorer` scored `case`."""
    seen = set()
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
        for layer in model.model.layers
    ]
    try:
        if enclosing is None:
            scorer.branch_nll(*case)
        else:
            with torch.autocast("cpu", dtype=enclosing):
                scorer.branch_nll(*case)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("kind", [PrefixSharedScorer, NaiveScorer])
def test_scoring_dtype_sets_the_precision_the_model_computes_in(kind):
    model = tiny_llama()
    case = random_case(seed=3)
    assert matmul_dtypes(model, kind(model, None, torch.bfloat16), case) == {torch.bfloat16}
    assert matmul_dtypes(model, kind(model, None), case) == {torch.float32}
    # float32 (or the model's own) turns an enclosing bf16 autocast (Lightning's bf16-mixed) off
    for dtype in (None, torch.float32):
        assert matmul_dtypes(model, kind(model, None, dtype), case, torch.bfloat16) == {
            torch.float32
        }
    # bf16 against the same scorer in float32: bf16's 8-bit mantissa moves NLLs near 4 by ~1e-2
    fp32 = kind(model, None).branch_nll(*case)
    got = kind(model, None, torch.bfloat16).branch_nll(*case)
    assert 3e-3 < max((g - w).abs().max().item() for g, w in zip(got, fp32)) < 0.1


def test_bf16_autocast_on_a_gpu_is_bf16_not_the_gpus_fp16_default():
    scorer = PrefixSharedScorer(tiny_llama(), None, torch.bfloat16)
    gpu = torch.device("cuda")
    on_gpu = patch.object(PrefixSharedScorer, "device", new_callable=PropertyMock, return_value=gpu)
    with on_gpu, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: torch disables it, keeps the dtype
        assert scorer.autocast().fast_dtype == torch.bfloat16


def test_a_bf16_model_scores_with_its_own_dtype_mask():
    # weights in bf16 and no scoring_dtype: the additive mask is built in the model's dtype
    model = tiny_llama().to(torch.bfloat16)
    case = random_case(seed=4)
    got = PrefixSharedScorer(model, None).branch_nll(*case)
    want = NaiveScorer(model, None).branch_nll(*case)
    fp32 = NaiveScorer(tiny_llama(), None).branch_nll(*case)
    assert max((g - w).abs().max().item() for g, w in zip(got, want)) < 0.03
    assert max((g - w).abs().max().item() for g, w in zip(got, fp32)) > 3e-3


def test_output_head_runs_chunk_size_positions_at_a_time():
    model = tiny_llama()
    case = random_case(seed=5)
    head = model.get_output_embeddings()
    rows = []
    hook = head.register_forward_hook(lambda m, i, out: rows.append(out.shape[0]))
    try:
        want = PrefixSharedScorer(model, None).branch_nll(*case)
        distinct = rows.pop()
        assert not rows  # one call holds every distinct position at the default chunk of 256
        got = PrefixSharedScorer(model, None, chunk_size=7).branch_nll(*case)
    finally:
        hook.remove()
    assert rows == [7] * (distinct // 7) + ([distinct % 7] if distinct % 7 else [])
    assert max((g - w).abs().max().item() for g, w in zip(got, want)) <= 1e-5


def test_states_without_branches_score_to_empty_tensors():
    model = tiny_llama()
    for scorer in (PrefixSharedScorer(model, None), NaiveScorer(model, None)):
        got = scorer.branch_nll([1, 2, 3], [2, 3], [[], []], [[], []])
        assert [g.shape for g in got] == [(0,), (0,)]
        assert scorer.tokens_processed == scorer.floor_tokens == 0


def test_a_state_after_the_first_token_is_scored():
    # state end 1: the branch follows the context's first token alone
    model = tiny_llama()
    want = -model(torch.tensor([[3, 35, 36]])).logits[0, :2].log_softmax(-1)
    for scorer in (PrefixSharedScorer(model, None), NaiveScorer(model, None)):
        (got,) = scorer.branch_nll([3, 14, 15], [1], [[[35, 36]]], [[0]])
        assert got.item() == pytest.approx(((want[0, 35] + want[1, 36]) / 2).item(), abs=1e-5)


def test_inputs_of_the_wrong_shape_are_refused_with_their_reason():
    shared = PrefixSharedScorer(tiny_llama(), None)
    cases = [
        (
            ([1, 2, 3], [2, 3], [[[4]]], [[0]]),
            "state_ends, branches and scored_from need one entry per state",
        ),
        (([1, 2, 3], [2], [[[4], [5]]], [[0]]), "scored_from needs one start per branch"),
        (([1, 2, 3], [4], [[[4]]], [[0]]), "state end 4 outside [1, 3]"),
        (([1, 2, 3], [3], [[[4, 5]]], [[2]]), "scored_from 2 leaves nothing to score in [4, 5]"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError) as err:
            shared.branch_nll(*args)
        assert str(err.value) == message
