from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from covo.rewards.base import Group
from covo.rewards.covo.reward import (
    NO_ANSWER_SCORE,
    CoVoReward,
    build_branches,
    encode,
    glued_newline,
    token_texts,
)
from covo.rewards.covo.scorer import NaiveScorer
from covo.rewards.covo.select import pass_threshold, pass_top1
from covo.rewards.covo.stats import CURIOSITY_FORMS

torch.set_num_threads(1)
CONF = Path(__file__).resolve().parents[1] / "conf"
PIECES = re.compile(r"\n|\\boxed|[{}]|[^\s{}]+| +")


class WordTokenizer:
    """Words, spaces, newlines, `\\boxed` and braces; ids assigned on first sight."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def id(self, piece: str) -> int:
        return self.vocab.setdefault(piece, len(self.vocab))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.id(p) for p in PIECES.findall(text)]

    def batch_decode(self, batch: list[list[int]], **_) -> list[str]:
        pieces = {i: p for p, i in self.vocab.items()}
        return ["".join(pieces[i] for i in ids) for ids in batch]


class FakeScorer:
    """Returns a chosen D [T, K] per response (keyed by its context) and records its inputs."""

    def __init__(self, tokenizer: WordTokenizer, distances: dict[tuple, list[list[float]]]):
        self.tokenizer = tokenizer
        self.distances = distances
        self.calls: list[tuple] = []

    def branch_nll(self, context_ids, state_ends, branches, scored_from, context_cache=None):
        assert context_cache is None
        self.calls.append((list(context_ids), state_ends, branches, scored_from))
        D = self.distances[tuple(context_ids)]
        assert len(D) == len(state_ends)
        return [torch.tensor(row) for row in D]


PROMPT = ["Question:", " ", "2+2?", "\n"]


def response(answer: str | None, i: int) -> list[str]:
    """Three lines (T = 3), the last without newline: steps end at tokens 2, 4, 6.

    The first token differs per response, so each response has its own context.
    """
    last = ["So", " \\boxed{" + answer + "}"] if answer else ["No", " idea"]
    return ["Try " + "abcdefgh"[i], "\n", "add them", ".\n", *last]


def make_case(answers, distances, nll_per_token=None):
    """Group of responses with `answers` and a scorer returning `distances[i]` for response i."""
    tokens = [response(a, i) for i, a in enumerate(answers)]
    return case_of_tokens(tokens, distances, nll_per_token)


def case_of_tokens(tokens, distances, nll_per_token=None, prompt=PROMPT):
    """Group of responses made of `tokens[i]` and a scorer returning `distances[i]`."""
    tok = WordTokenizer()
    prompt_ids = [tok.id(p) for p in prompt]
    ids = [[tok.id(t) for t in ts] for ts in tokens]
    nlls = nll_per_token or [[1.0] * len(ts) for ts in tokens]
    group = Group(
        prompt_ids=prompt_ids,
        response_ids=ids,
        texts=["".join(ts) for ts in tokens],
        token_logprobs=[-torch.tensor(v) for v in nlls],
        token_entropy=[torch.zeros(len(ts)) for ts in tokens],
        token_self_certainty=[torch.zeros(len(ts)) for ts in tokens],
    )
    table = {tuple(prompt_ids + r): d for r, d in zip(ids, distances) if d is not None}
    return group, FakeScorer(tok, table)


# Cluster "4" (responses 0, 1) stays with its answer; cluster "5" (response 2) drifts.
# r0: ratios (1/2, 1/2, 1/2) -> Con 1, Vol 0
# r1: ratios (2, 1/2, 1/2) -> Con 2/3, Vol (0 + 1) / 3 = 1/3
# r2 (own column 1): ratios (2, 1/2, 2) -> Con 1/3, Vol (2 + 1) / 3 = 1
D0 = [[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]]
D1 = [[2.0, 1.0], [1.0, 2.0], [1.0, 2.0]]
D2 = [[1.0, 2.0], [2.0, 1.0], [1.0, 2.0]]
# RiV of "4": x = (1 + 2/3 cos(1/3)) / 2 = 0.814986, y = (2/3 sin(1/3)) / 2 = 0.109065
# -> sqrt(0.664202 + 0.011895) = 0.822251; RiV of "5": 1/3 * |(cos 1, sin 1)| = 1/3
RIV_4, RIV_5 = 0.822251, 1 / 3


def test_consistent_cluster_passes_drifting_cluster_fails():
    group, scorer = make_case(["4", "4", "5", None], [D0, D1, D2, None])
    out = CoVoReward()(group, scorer)
    assert out.clusters == [0, 0, 1, -1]
    assert out.rewards == [1.0, 1.0, 0.0, 0.0]
    assert out.verdicts == [True, False]
    assert out.scores[:3] == pytest.approx([RIV_4, RIV_4, RIV_5], abs=1e-6)
    assert out.scores[3] == NO_ANSWER_SCORE
    c = out.components
    assert c["consistency"][:3] == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert c["volatility"][:3] == pytest.approx([0.0, 1 / 3, 1.0])
    assert c["intrinsic"][:3] == pytest.approx([RIV_4, RIV_4, RIV_5], abs=1e-6)
    assert c["num_states"][:3] == [3.0, 3.0, 3.0]
    assert all(math.isnan(c[name][3]) for name in c)
    assert all(math.isnan(v) for v in c["curiosity"])  # off by default
    assert out.group_metrics == {"num_answers": 2.0, "pass_frac": 0.5}
    assert out.details["representatives"] == ["4", "5"]
    assert out.details["D"][:3] == [D0, D1, D2]
    assert out.details["ratios"][0] == [0.5, 0.5, 0.5]
    assert out.details["step_ends"][:3] == [[2, 4, 6]] * 3
    assert out.details["state_ends"][0] == [6, 8, 10]  # prompt of 4 tokens + step ends
    assert out.details["D"][3] is None
    assert len(scorer.calls) == 3  # the answerless response is never scored


@pytest.mark.parametrize(
    ("knobs", "cuts", "scored_from", "prefixes"),
    [
        # released: states end after "\n", ".\n" and " \boxed{4}". The released text
        # `state + "\nThe answer is: ..."` scores every token reaching past the state: the token
        # holding the newline (cut off the context and scored) or, after the last state, the
        # newline put there; then the template and answer
        ({}, [5, 7, 10], [[0, 0]] * 3, [["\n"], [".\n"], ["\n"]]),
        # without it: only the last state gets a newline in front, never scored
        ({"newline_scored": False}, [6, 8, 10], [[0, 0], [0, 0], [1, 1]], [[], [], ["\n"]]),
        # "4", "}" follow the 8 template tokens ("The", " ", "answer", " ", "is:", " ", ...)
        ({"distance_tokens": "answer"}, [6, 8, 10], [[8, 8], [8, 8], [9, 9]], [[], [], ["\n"]]),
        # paper states: the prompt (ends with "\n"), after step 0, after step 1
        ({"include_prompt_state": True}, [3, 5, 7], [[0, 0]] * 3, [["\n"], ["\n"], [".\n"]]),
    ],
)
def test_states_and_branches_passed_to_the_scorer(knobs, cuts, scored_from, prefixes):
    group, scorer = make_case(["4", "5"], [D0, D2])
    out = CoVoReward(**knobs)(group, scorer)
    tok = scorer.tokenizer
    plain = [tok.encode("The answer is: \\boxed{" + a + "}") for a in ("4", "5")]
    _, got_cuts, branches, got_scored_from = scorer.calls[0]
    assert (got_cuts, got_scored_from) == (cuts, scored_from)
    assert branches == [[[tok.id(t) for t in prefix] + b for b in plain] for prefix in prefixes]
    # the states themselves do not move
    paper = knobs.get("include_prompt_state", False)
    assert out.details["state_ends"][0] == ([4, 6, 8] if paper else [6, 8, 10])


def test_scoring_starts_inside_a_token_merged_across_the_brace():
    def tokenize(text: str) -> list[int]:
        return [ord(p[0]) * 100 + len(p) for p in re.findall(r"\{\d|\\boxed|.", text)]

    # "x\boxed{" -> x, \boxed, {   but "x\boxed{4}" -> x, \boxed, {4, }
    branches, starts = build_branches(tokenize, "x\\boxed{", ["4"], "answer")
    assert len(branches[0]) == 4
    assert starts == [2]  # after the common prefix x, \boxed
    assert build_branches(tokenize, "x\\boxed{", ["4"], "template_and_answer")[1] == [0]
    # the template "{" merges with the answer: "{4", "}" and "{4", "2", "}" are scored whole
    branches, starts = build_branches(tokenize, "{", ["4", "42"], "answer")
    assert branches == [[12302, 12501], [12302, 5001, 12501]] and starts == [0, 0]
    # "x{" and "x{4}": x in common (an odd prefix); the empty answer "x{}": only "}" is scored
    assert build_branches(tokenize, "x{", ["4", ""], "answer")[1] == [1, 2]


def test_several_clusters_can_pass_in_binary_mode():
    D = [[[1.0, 2.0, 3.0]] * 3, [[2.0, 1.0, 3.0]] * 3, [[1.0, 2.0, 3.0]] * 3]
    group, scorer = make_case(["4", "5", "6"], D)
    # "4": ratios 1/2 -> Con 1, Vol 0 -> RiV 1; "5": 1/2 -> 1; "6": 3/1 -> Con 0 -> RiV 0
    out = CoVoReward()(group, scorer)
    assert out.rewards == [1.0, 1.0, 0.0]
    assert out.verdicts == [True, True, False]
    assert out.group_metrics["pass_frac"] == pytest.approx(2 / 3)


def test_single_cluster_gives_zero_and_is_not_scored():
    group, scorer = make_case(["4", "4.0", None], [None, None, None])
    out = CoVoReward()(group, scorer)
    assert out.rewards == [0.0, 0.0, 0.0]
    assert out.scores == [0.0, 0.0, NO_ANSWER_SCORE]
    assert out.verdicts == [False]
    assert out.group_metrics == {"num_answers": 1.0}
    assert scorer.calls == []


def test_continuous_mode_and_paper_knobs():
    # r0 row 0 is a tie (ratio 1), then 1/2, then 2: released Con 1/3, Vol 3/3;
    # paper (ties consistent) Con 2/3, Vol m / T = 2/3
    tie_then_drift = [[1.0, 1.0], [1.0, 2.0], [2.0, 1.0]]
    group, scorer = make_case(["4", "5"], [tie_then_drift, D2])
    released = CoVoReward(aggregation="linear", mode="continuous")(group, scorer)
    assert released.components["consistency"][0] == pytest.approx(1 / 3)
    assert released.components["volatility"][0] == pytest.approx(1.0)
    assert released.rewards[0] == pytest.approx(1 / 3 - 1)  # RiL, a continuous reward
    paper = CoVoReward(
        aggregation="linear", mode="continuous", ties_consistent=True, volatility_index="paper"
    )(group, scorer)
    assert paper.components["consistency"][0] == pytest.approx(2 / 3)
    assert paper.components["volatility"][0] == pytest.approx(2 / 3)
    assert paper.rewards[0] == pytest.approx(0.0)
    # r2: Con 1/3; Vol: last r > 1 at m = 2 -> 2/3 -> RiL = -1/3
    assert paper.rewards[1] == pytest.approx(1 / 3 - 2 / 3)


# token NLLs per step of response 0: [1, 1], [3, 1], [2, 0]
# paper: 1 - 0; 2 - ln(1 + 0.130812) = 1.877064; [2, 0]: P = (1, 0), KL = ln 2,
#   1 - ln(1.693147) = 0.473411 -> mean (1 + 1.877064 + 0.473411) / 3 = 1.116825
# released: e - 0 = 2.718282; e^2 - ln(1 + 0.130812^(1/3)) = 6.978516;
#   e - ln(1 + (ln 2)^(1/3)) = 2.718282 - 0.633926 = 2.084356 -> mean 3.927051 > 2: bonus 0.4
NLLS = [[1.0, 1.0, 3.0, 1.0, 2.0, 0.0], [1.0] * 6, [1.0] * 6]


def test_curiosity_is_added_to_the_reward_when_on():
    group, scorer = make_case(["4", "4", "5"], [D0, D1, D2], NLLS)
    paper = CoVoReward(curiosity={"form": "paper", "weight": 0.1})(group, scorer)
    assert paper.components["curiosity"][0] == pytest.approx(1.116825, abs=1e-6)
    assert paper.components["curiosity"][2] == pytest.approx(1.0)  # all NLLs 1: KL 0
    assert paper.rewards[0] == pytest.approx(1.0 + 0.1 * 1.116825, abs=1e-6)
    assert paper.rewards[2] == pytest.approx(0.0 + 0.1 * 1.0)
    released = CoVoReward(curiosity={"form": "released", "weight": 0.5})(group, scorer)
    assert released.components["curiosity"][0] == pytest.approx(3.927051, abs=1e-6)
    assert released.components["curiosity"][2] == pytest.approx(math.e)  # e^1 > 2
    assert released.rewards == pytest.approx([1.2, 1.2, 0.2])  # + 0.5 * 0.4 each
    off = CoVoReward(curiosity={"form": "paper", "weight": 0.0})(group, scorer)
    assert off.rewards == [1.0, 1.0, 0.0]
    assert all(math.isnan(v) for v in off.components["curiosity"])


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("aggregation", "one of linear, vector, consistency, volatility"),
        ("mode", "binary or continuous"),
        ("colon_merge", "pairs or chains"),
        ("distance_tokens", "template_and_answer or answer"),
        ("volatility_index", "released or paper"),
        ("select", "threshold or top1"),
    ],
)
def test_an_unknown_choice_is_refused_under_its_own_key(key, expected):
    with pytest.raises(ValueError, match=rf"^reward\.{key}=bogus: expected {expected}$"):
        CoVoReward(**{key: "bogus"})


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"threshold": -1.5}, "threshold=-1.5: expected a number in [-1, 1]"),
        ({"threshold": 1.5}, "threshold=1.5: expected a number in [-1, 1]"),
        ({"max_steps": 0}, "max_steps=0: expected an integer >= 1"),
        ({"short_penalty": "high"}, "short_penalty=high: expected null or a number"),
        (
            {"curiosity": {"form": "paper", "weight": -0.1}},
            "curiosity.weight=-0.1: expected a number >= 0",
        ),
    ],
)
def test_an_out_of_range_number_is_refused_under_its_own_key(knobs, message):
    with pytest.raises(ValueError, match="^" + re.escape("reward." + message) + "$"):
        CoVoReward(**knobs)


def test_unknown_knob_values_are_refused():
    with pytest.raises(
        ValueError, match=r"^reward\.curiosity\.form=bored: expected released or paper$"
    ):
        CoVoReward(curiosity={"form": "bored", "weight": 1.0})


# Qwen's pre-tokenizer: punctuation keeps the newlines that follow it (`.\n`, `}\n`)
GLUED = r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def byte_level_tokenizer(glue_newlines: bool = False) -> PreTrainedTokenizerFast:
    corpus = ["Question: what is 2+2?\nFirst we add.\nThen 2 + 2 = 4.\nSo \\boxed{4}\nDone"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if glue_newlines:
        split = pre_tokenizers.Split(Regex(GLUED), behavior="isolated")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def branch_nll_oracle(model, context: list[int], branch: list[int], start: int) -> float:
    """Mean NLL of branch[start:] after context, from one plain forward."""
    ids = torch.tensor([context + branch])
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)
    positions = range(len(context) + start, len(context) + len(branch))
    return -sum(logp[p - 1, ids[0, p]].item() for p in positions) / len(positions)


def released_distance(model, tok, state: str, answer: str) -> float:
    """The released code's distance of `answer` from `state` (text): tokenise
    `state + "\\nThe answer is: \\boxed{answer}"` as one text and average the NLL of every
    token that reaches past `state` (its greedy extra token left out)."""
    enc = tok(state + "\nThe answer is: \\boxed{" + answer + "}", return_offsets_mapping=True)
    ids = enc["input_ids"]
    scored = [p for p, (_, end) in enumerate(enc["offset_mapping"]) if end > len(state)]
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return -sum(logp[p - 1, ids[p]].item() for p in scored) / len(scored)


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    # a wide init makes the NLLs depend on the context, so a wrong state or prefix shows
    sizes = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, initializer_range=0.3)
    config = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=2, num_key_value_heads=2, **sizes)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


TEXTS = [
    "First we add.\nThen 2 + 2 = 4.\nSo \\boxed{4}",
    "First we add.\nThen 2 + 2 = 5.\nSo \\boxed{5}",
    "We add.\nSo \\boxed{4}\n",
]


@pytest.mark.parametrize("glue_newlines", [False, True], ids=["newline_alone", "glued"])
def test_distances_are_the_released_codes(glue_newlines):
    """Every state of every response against the released code's text-level rule, with a
    tokenizer that keeps newlines apart and one that glues them to punctuation (`.\n`, `}\n`:
    then the released text re-tokenises the last state's `}` with the newline)."""
    hf = byte_level_tokenizer(glue_newlines)
    model = tiny_llama(len(hf))
    prompt_text = "Question: what is 2+2?\n"
    prompt = hf.encode(prompt_text, add_special_tokens=False)
    ids = [hf.encode(t, add_special_tokens=False) for t in TEXTS]
    if glue_newlines:  # "add.\n" ends state 0 inside one token; "}" + "\n" is one token
        assert [hf.decode(t) for t in ids[0][3:5]] == [".\n", "Then"]
        assert hf.decode(ids[0][-1:]) == "}" and len(hf.encode("}\n")) == 1
    group = Group(prompt, ids, TEXTS, *([[torch.zeros(len(r)) for r in ids]] * 3))
    out = CoVoReward(mode="continuous")(group, NaiveScorer(model, hf))
    assert out.clusters == [0, 1, 0]
    for i, text in enumerate(TEXTS):
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        assert len(out.details["D"][i]) == len(lines)
        for k, row in enumerate(out.details["D"][i]):
            state = "\n".join(lines[: k + 1])
            want = [released_distance(model, hf, prompt_text + state, a) for a in ("4", "5")]
            assert row == pytest.approx(want, abs=1e-5), (i, k)


def test_tiny_llama_end_to_end():
    hf = byte_level_tokenizer()
    model = tiny_llama(len(hf))

    def encode(text: str) -> list[int]:
        return hf.encode(text, add_special_tokens=False)

    texts = TEXTS
    prompt_text = "Question: what is 2+2?\n"
    prompt = encode(prompt_text)
    ids = [encode(t) for t in texts]
    group = Group(prompt, ids, texts, *([[torch.zeros(len(r)) for r in ids]] * 3))
    out = CoVoReward(mode="continuous")(group, NaiveScorer(model, hf))

    assert out.clusters == [0, 1, 0]
    # "First", " we", " add", ".", "\n" | "Then", ..., " 4", ".", "\n" | "So", ..., "}"
    assert out.details["step_ends"][0] == [5, 13, 19]
    assert out.details["step_ends"][2] == [5, 12]  # "W", "e", " add", ".", "\n" | "So", ..., "\n"
    branches = [encode("The answer is: \\boxed{" + a + "}") for a in ("4", "5")]
    context = prompt + ids[0]
    # without the newline token: the branch after "add.\n", scored from its first token
    plain = CoVoReward(mode="continuous", newline_scored=False)(group, NaiveScorer(model, hf))
    for k in range(2):
        want = branch_nll_oracle(model, context[: len(prompt) + 5], branches[k], 0)
        assert plain.details["D"][0][0][k] == pytest.approx(want, abs=1e-5)
        assert abs(plain.details["D"][0][0][k] - out.details["D"][0][0][k]) > 1e-3
    # continuous reward of cluster "4" = RiV of its members' (Con, Vol)
    cons = [out.components["consistency"][i] for i in (0, 2)]
    vols = [out.components["volatility"][i] for i in (0, 2)]
    riv = abs(sum(c * complex(math.cos(v), math.sin(v)) for c, v in zip(cons, vols))) / 2
    assert out.rewards[0] == out.rewards[2] == pytest.approx(riv)

    answer_only = CoVoReward(distance_tokens="answer")(group, NaiveScorer(model, hf))
    template_len = len(encode("The answer is: \\boxed{"))  # "{4" is not merged here
    want = branch_nll_oracle(model, context[: len(prompt) + 5], branches[0], template_len)
    assert answer_only.details["D"][0][0][0] == pytest.approx(want, abs=1e-5)


# what each config changes against `covo` (the released code's semantics)
CONFIG_CHANGES = {
    "covo": {},
    "covo_paper": {
        "extract": "extract_boxed",
        "colon_merge": "chains",
        "newline_scored": False,
        "to_reward": "_continuous",
        "include_prompt_state": True,
        "distance_tokens": "answer",
        "ties_consistent": True,
        "volatility_index": "paper",
        "curiosity": CURIOSITY_FORMS["paper"],
        "curiosity_weight": 0.1,
    },
    "covo_linear": {"aggregate": "aggregate_linear", "threshold": 0.05},
    "consistency": {"aggregate": "aggregate_consistency"},
    "volatility": {"aggregate": "aggregate_volatility"},
}


def knobs(reward: CoVoReward) -> dict:
    names = (
        "max_steps",
        "colon_merge",
        "include_prompt_state",
        "distance_tokens",
        "newline_scored",
        "ties_consistent",
        "volatility_index",
    )
    return {
        "extract": reward.extract.__name__,
        "aggregate": reward.aggregate.__name__,
        "to_reward": reward.to_reward.__name__,
        "threshold": reward.threshold,
        "curiosity": reward.curiosity,
        "curiosity_weight": reward.curiosity_weight,
        "template": reward.template,
        **{name: getattr(reward, name) for name in names},
    }


@pytest.mark.parametrize("name", list(CONFIG_CHANGES))
def test_reward_configs_compose(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        reward = instantiate(compose(overrides=[f"+reward={name}"]).reward)
    assert knobs(reward) == knobs(CoVoReward()) | CONFIG_CHANGES[name]


def one_line(answer: str, i: int) -> list[str]:
    """A bare answer, no reasoning: one step, so T = 1."""
    return ["Just" + "abcdefgh"[i], " \\boxed{" + answer + "}"]


# Four responses, K = 3; columns "5", "4", "6". With 3 states each row picks who is nearest:
# r0 "5": ratios (2, 1/2, 1/2) -> Con 2/3, Vol (0 + 1) / 3 = 1/3
# r1 "4": ratios (2, 1/2, 1/2) -> Con 2/3, Vol 1/3 (the same as r0)
# r2 "4", one line: ratio 1/2 -> Con 1, Vol 0
# r3 "6", one line: ratio 1/2 -> Con 1, Vol 0
SHORTCUT = (
    [response("5", 0), response("4", 1), one_line("4", 2), one_line("6", 3)],
    [
        [[2.0, 1.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]],
        [[1.0, 2.0, 3.0], [2.0, 1.0, 3.0], [2.0, 1.0, 3.0]],
        [[2.0, 1.0, 3.0]],
        [[2.0, 3.0, 1.0]],
    ],
)
# RiV of one member = its Con; "4" with both members: (2/3, 1/3) and (1, 0) -> RIV_4
RIV_ONE = 2 / 3


def test_one_line_answers_top_the_released_rule():
    group, scorer = case_of_tokens(*SHORTCUT)
    out = CoVoReward()(group, scorer)
    assert out.clusters == [0, 1, 1, 2]
    assert out.components["num_states"] == [3.0, 3.0, 1.0, 1.0]
    assert out.scores == pytest.approx([RIV_ONE, RIV_4, RIV_4, 1.0], abs=1e-6)
    # the bare "6" scores highest of all and passes with the others
    assert out.verdicts == [True, True, True]
    assert out.rewards == [1.0] * 4


def test_min_states_drops_short_trajectories_from_their_cluster():
    group, scorer = case_of_tokens(*SHORTCUT)
    out = CoVoReward(min_states=2)(group, scorer)
    # "5" 2/3; "4" counts r1 only: 2/3; "6" has no member with 2 states: no value, fails
    assert out.verdicts == [True, True, False]
    assert out.scores == pytest.approx([RIV_ONE, RIV_ONE, RIV_ONE, NO_ANSWER_SCORE], abs=1e-6)
    assert out.components["intrinsic"][:3] == pytest.approx([RIV_ONE] * 3, abs=1e-6)
    assert math.isnan(out.components["intrinsic"][3])
    # r2 gave the answer of a passing cluster: it keeps that reward
    assert out.rewards == [1.0, 1.0, 1.0, 0.0]
    # its own Con / Vol are still reported
    assert out.components["consistency"] == pytest.approx([2 / 3, 2 / 3, 1.0, 1.0])
    assert out.group_metrics["pass_frac"] == pytest.approx(2 / 3)


def test_short_penalty_replaces_the_reward_of_short_trajectories():
    group, scorer = case_of_tokens(*SHORTCUT)
    out = CoVoReward(min_states=2, short_penalty=-0.5)(group, scorer)
    assert out.rewards == [1.0, 1.0, -0.5, -0.5]
    assert out.verdicts == [True, True, False]
    # without min_states no trajectory is short: the penalty never applies
    assert CoVoReward(short_penalty=-0.5)(group, scorer).rewards == [1.0] * 4


def test_a_cluster_of_short_trajectories_gets_nothing_in_continuous_mode():
    group, scorer = case_of_tokens(*SHORTCUT)
    out = CoVoReward(mode="continuous", min_states=2)(group, scorer)
    assert out.rewards == pytest.approx([RIV_ONE, RIV_ONE, RIV_ONE, 0.0], abs=1e-6)
    released = CoVoReward(mode="continuous")(group, scorer)
    assert released.rewards == pytest.approx([RIV_ONE, RIV_4, RIV_4, 1.0], abs=1e-6)


def test_top1_passes_only_the_highest_cluster():
    group, scorer = case_of_tokens(*SHORTCUT)
    # values 2/3, RIV_4, 1: alone, top1 picks the bare "6"
    out = CoVoReward(select="top1")(group, scorer)
    assert out.verdicts == [False, False, True]
    assert out.rewards == [0.0, 0.0, 0.0, 1.0]
    assert out.group_metrics["pass_frac"] == pytest.approx(1 / 3)


def test_guarded_ties_go_to_the_larger_cluster():
    group, scorer = case_of_tokens(*SHORTCUT)
    # "5" and "4" (r1 counted) tie at exactly the same value; "4", seen later, has 2 members
    out = CoVoReward(min_states=2, select="top1")(group, scorer)
    assert out.scores[0] == out.scores[1]
    assert out.verdicts == [False, True, False]
    assert out.rewards == [0.0, 1.0, 1.0, 0.0]


def test_top1_full_ties_go_to_the_cluster_seen_first():
    # "5" then "4", each one response with the same Con 1, Vol 0: equal value and size
    distances = [[[1.0, 2.0]] * 3, [[2.0, 1.0]] * 3]
    group, scorer = case_of_tokens([response("5", 0), response("4", 1)], distances)
    out = CoVoReward(select="top1")(group, scorer)
    assert out.details["representatives"] == ["5", "4"]
    assert out.scores == [1.0, 1.0]
    assert out.verdicts == [True, False]
    assert out.rewards == [1.0, 0.0]


def test_top1_ignores_the_threshold_and_no_value_passes_nothing():
    assert pass_top1([0.1, 0.2], [1, 1], 0.5) == [False, True]
    assert pass_threshold([0.1, 0.2], [1, 1], 0.5) == [False, False]
    # a value at the threshold passes it (the released `>=`)
    assert pass_threshold([0.5, 0.49, None], [1, 1, 1], 0.5) == [True, False, False]
    # every response one line: no cluster has a value, none passes, every reward is 0
    tokens = [one_line(a, i) for i, a in enumerate(["4", "5", "5"])]
    group, scorer = case_of_tokens(tokens, [[[1.0, 2.0]], [[2.0, 1.0]], [[2.0, 1.0]]])
    out = CoVoReward(min_states=2, select="top1")(group, scorer)
    assert out.verdicts == [False, False]
    assert out.rewards == [0.0, 0.0, 0.0]
    assert out.scores == [NO_ANSWER_SCORE] * 3


def test_bad_guard_values_are_refused():
    with pytest.raises(ValueError, match=r"^reward\.min_states=0: expected an integer >= 1$"):
        CoVoReward(min_states=0)
    with pytest.raises(ValueError, match=r"^reward\.select=best: expected threshold or top1$"):
        CoVoReward(select="best")


def test_covo_guarded_is_covo_with_the_guards_on():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        guarded = instantiate(compose(overrides=["+reward=covo_guarded"]).reward)
        covo = instantiate(compose(overrides=["+reward=covo"]).reward)
    assert knobs(guarded) == knobs(covo)
    assert (guarded.min_states, guarded.short_penalty, guarded.select) == (2, None, "top1")
    assert (covo.min_states, covo.short_penalty, covo.select) == (1, None, "threshold")


def test_a_token_holding_part_of_a_character_is_not_glued_to_the_newline():
    class Merging:  # "}" and "\n" merge into one token; so do a broken byte and "\n"
        ids = {"}": [1], "}\n": [2], "\ufffd": [3], "\ufffd\n": [4], "a": [5], "a\n": [5, 10]}

        def encode(self, text, add_special_tokens=False):
            return self.ids[text]

    assert glued_newline(Merging(), "}", [10]) == [2]
    assert glued_newline(Merging(), "a", [10]) is None  # no merge: the newline is put after
    assert glued_newline(Merging(), "\ufffd", [10]) is None


def test_an_unanswered_response_does_not_stop_the_ones_after_it():
    group, scorer = make_case([None, "4", "4", "5"], [None, D0, D1, D2])
    out = CoVoReward()(group, scorer)
    assert out.answers == [None, "4", "4", "5"]
    assert out.clusters == [-1, 0, 0, 1]
    assert out.rewards == [0.0, 1.0, 1.0, 0.0]
    assert out.details["step_ends"] == [None, [2, 4, 6], [2, 4, 6], [2, 4, 6]]
    assert out.scores[1:] == pytest.approx([RIV_4, RIV_4, RIV_5], abs=1e-6)


def colon_lines(answer: str, i: int) -> list[str]:
    """Five lines: `x:`, `b:`, `c`, `d`, the answer (x differs per response)."""
    return ["abcdefgh"[i] + ":", "\n", "b:", "\n", "c", "\n", "d", "\n", " \\boxed{" + answer + "}"]


def test_the_colon_merge_chosen_is_the_one_applied():
    # 5 lines >= max_steps 3: chains fold `a:`, `b:`, `c` into one step (ends 6, 8, 9);
    # pairs join `a:` `b:` only (ends 4, 6, 8, 9), then 4 units make 3 chunks of 1, 1, 2
    tokens = [colon_lines("4", 0), colon_lines("5", 1)]
    distances = [[[1.0, 2.0]] * 3, [[2.0, 1.0]] * 3]
    group, scorer = case_of_tokens(tokens, distances)
    chains = CoVoReward(max_steps=3, colon_merge="chains")(group, scorer)
    assert chains.details["step_ends"] == [[6, 8, 9], [6, 8, 9]]
    pairs = CoVoReward(max_steps=3, colon_merge="pairs")(group, scorer)
    assert pairs.details["step_ends"] == [[4, 6, 9], [4, 6, 9]]


def test_a_prompt_state_without_a_newline_gets_the_newline_put_after_it():
    # the prompt ends in "2+2?": the paper's s_0 ends there, so its branches get "\n" in front
    # (cut at the prompt's end); the states after "\n" and ".\n" cut off that token
    group, scorer = case_of_tokens(
        [response("4", 0), response("5", 1)], [D0, D2], prompt=["Question:", " ", "2+2?"]
    )
    CoVoReward(include_prompt_state=True)(group, scorer)
    tok = scorer.tokenizer
    plain = [tok.encode("The answer is: \\boxed{" + a + "}") for a in ("4", "5")]
    _, cuts, branches, scored_from = scorer.calls[0]
    assert cuts == [3, 4, 6] and scored_from == [[0, 0]] * 3
    prefixes = [[tok.id("\n")], [tok.id("\n")], [tok.id(".\n")]]
    assert branches == [[prefix + b for b in plain] for prefix in prefixes]


def test_a_single_cluster_is_segmented_only_for_curiosity():
    group, scorer = make_case(["4", "4.0", None], [None, None, None], NLLS)
    off = CoVoReward()(group, scorer)
    assert off.details["step_ends"] == [None, None, None]
    # weight 0.1: the curiosity of test_curiosity_is_added_to_the_reward_when_on is reported,
    # but K = 1 gives no cluster term and so no bonus
    on = CoVoReward(curiosity={"form": "paper", "weight": 0.1})(group, scorer)
    assert on.components["curiosity"][:2] == pytest.approx([1.116825, 1.0], abs=1e-6)
    assert math.isnan(on.components["curiosity"][2])
    assert on.details["step_ends"] == [[2, 4, 6], [2, 4, 6], None]
    assert on.rewards == [0.0, 0.0, 0.0]


def test_each_response_is_scored_with_its_own_context_cache():
    seen = []

    class CachedScorer(FakeScorer):
        def branch_nll(self, context_ids, state_ends, branches, scored_from, context_cache=None):
            seen.append(context_cache)
            return super().branch_nll(context_ids, state_ends, branches, scored_from)

    group, scorer = make_case(["4", "5"], [D0, D2])
    group.context_caches = ["cache of 0", "cache of 1"]
    CoVoReward()(group, CachedScorer(scorer.tokenizer, scorer.distances))
    assert seen == ["cache of 0", "cache of 1"]


def test_the_branch_ids_are_the_template_answers_and_newline():
    tok = WordTokenizer()
    ids = CoVoReward().branch_ids(tok, ["4", "5"])
    template = [tok.id(p) for p in ["The", " ", "answer", " ", "is:", " ", "\\boxed", "{"]]
    assert ids["template_ids"] == template
    assert ids["answer_ids"] == [template + [tok.id(a), tok.id("}")] for a in ("4", "5")]
    assert ids["scored_from"] == [0, 0]
    assert ids["newline_ids"] == [tok.id("\n")]


def test_the_answer_equivalence_given_is_the_one_used():
    # "4" and "5" are two clusters by default; an equivalence that finds every pair equal
    # leaves one cluster: K = 1, nothing scored, every reward 0
    group, scorer = make_case(["4", "4", "5"], [D0, D1, D2])
    same = CoVoReward(equivalence=lambda a, b: True)(group, scorer)
    assert same.clusters == [0, 0, 0]
    assert same.details["representatives"] == ["4"]
    assert same.rewards == [0.0, 0.0, 0.0]
    assert scorer.calls == []


def test_token_texts_keep_special_tokens_and_spaces_before_punctuation():
    # a tokenizer that cleans up spaces by default (" ," -> ","), with an end token: each
    # token's text is its own, so the texts join back to the response as written
    vocab = {"So": 0, " ,": 1, "\n": 2, "<|end|>": 3, "[UNK]": 4}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Split(Regex(r" ,|\n|\w+"), behavior="isolated")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=words, eos_token="<|end|>", clean_up_tokenization_spaces=True
    )
    assert token_texts(hf, [0, 1, 2, 3]) == ["So", " ,", "\n", "<|end|>"]


def test_texts_are_encoded_without_the_tokenizers_special_tokens():
    # a tokenizer that puts a start token before every text it encodes: a branch or a state's
    # text re-tokenised for the newline must not carry it
    vocab = {"<s>": 0, "So": 1, "\n": 2, "[UNK]": 3}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\w+"), behavior="isolated")
    start = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    words.post_processor = start
    hf = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>")
    assert hf.encode("So\n") == [0, 1, 2]  # the start token is there by default
    assert encode(hf, "So\n") == [1, 2]
