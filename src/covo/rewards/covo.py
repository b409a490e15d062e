"""CoVo: reward answer clusters whose trajectories lean towards their own answer early and stay.

Glue between answer clustering, step segmentation, the scorer (distance matrices) and the
statistics in `covo_stats` (COVO_SPEC sections 2-7). Every paper / released-code difference is
a constructor knob; `conf/reward/covo.yaml` and `covo_paper.yaml` set the two readings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial

import torch

from covo.answers import AnswerEquivalence
from covo.rewards.answered import AnswerClustering
from covo.rewards.base import Group, GroupReward, Scorer
from covo.rewards.covo_stats import (
    AGGREGATIONS,
    CURIOSITY_FORMS,
    VOLATILITY_OFFSETS,
    consistency,
    distance_ratios,
    volatility,
)
from covo.segmentation import states, step_ends

# Below every aggregation's range (linear RiL >= -1, the others >= 0): answerless responses
# rank last for AUROC.
NO_ANSWER_SCORE = -1.0


def _binary(value: float, threshold: float) -> float:
    return float(value >= threshold)


def _continuous(value: float, threshold: float) -> float:
    return value


MODES: dict[str, Callable[[float, float], float]] = {"binary": _binary, "continuous": _continuous}


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _from_template_start(template_ids: list[int], branch_ids: list[int]) -> int:
    return 0


def _from_answer_start(template_ids: list[int], branch_ids: list[int]) -> int:
    # A common prefix rather than len(template_ids): a token merged across the `{` boundary
    # (e.g. `{4`) then counts as an answer token. At least the closing token is always scored.
    return min(_common_prefix_len(template_ids, branch_ids), len(branch_ids) - 1)


SCORED_FROM: dict[str, Callable[[list[int], list[int]], int]] = {
    "template_and_answer": _from_template_start,
    "answer": _from_answer_start,
}


def build_branches(
    tokenize: Callable[[str], list[int]],
    template: str,
    representatives: list[str],
    prefix: list[int],
    distance_tokens: str,
) -> tuple[list[list[int]], list[int]]:
    """Branch ids `prefix + tokenize(template + y_k + "}")` per answer and where scoring starts.

    The branch text is tokenised on its own (matching the joint tokenisation after a state that
    ends in a newline); `prefix` is the newline for a state that does not end with one and is
    never scored.
    """
    template_ids = tokenize(template)
    branches, scored_from = [], []
    for answer in representatives:
        ids = tokenize(template + answer + "}")
        branches.append(prefix + ids)
        scored_from.append(len(prefix) + SCORED_FROM[distance_tokens](template_ids, ids))
    return branches, scored_from


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` on its own, without special tokens."""
    return tokenizer.encode(text, add_special_tokens=False)


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Decoded text of each token on its own."""
    return tokenizer.batch_decode(
        [[t] for t in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )


class CoVoReward(AnswerClustering):
    """Consistency and volatility of intermediate states, aggregated per answer cluster.

    Knobs (paper vs released code, COVO_SPEC section 11): `aggregation` (a key of
    `AGGREGATIONS`), `mode` (`binary`: 1 when the cluster value >= `threshold`; `continuous`:
    the value), `include_prompt_state`, `distance_tokens` (`answer` | `template_and_answer`),
    `ties_consistent`, `volatility_index` (`released` | `paper`), `curiosity`
    (`{"form": "released" | "paper", "weight": w}`; w = 0 turns it off).

    Output: `scores` = the cluster's aggregated value (`NO_ANSWER_SCORE` without an answer, 0
    when K <= 1); components `consistency`, `volatility`, `curiosity` (NaN when off),
    `intrinsic` (cluster value), `num_states`; details per response `D` [T][K], `ratios`,
    `step_ends` (in response tokens), `state_ends` (in prompt + response tokens), plus the
    cluster `representatives`. `uses_scorer`: the rollout may keep its keys and values for the
    scorer (`Group.context_caches`). The curiosity term is added only where the cluster term exists
    (an answer and K >= 2).
    """

    uses_scorer = True

    def __init__(
        self,
        extractor: str = "boxed_or_last_number",
        aggregation: str = "vector",
        mode: str = "binary",
        threshold: float = 0.5,
        max_steps: int = 15,
        include_prompt_state: bool = False,
        distance_tokens: str = "template_and_answer",
        ties_consistent: bool = False,
        volatility_index: str = "released",
        curiosity: Mapping | None = None,
        template: str = "The answer is: \\boxed{",
        timeout_s: float = 2.0,
        equivalence: AnswerEquivalence | None = None,
    ):
        for name, value, valid in [
            ("aggregation", aggregation, AGGREGATIONS),
            ("mode", mode, MODES),
            ("distance_tokens", distance_tokens, SCORED_FROM),
            ("volatility_index", volatility_index, VOLATILITY_OFFSETS),
        ]:
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        curiosity = dict(curiosity or {})
        form = curiosity.get("form", "released")
        if form not in CURIOSITY_FORMS:
            raise ValueError(
                f"unknown curiosity form {form!r}; valid: {', '.join(CURIOSITY_FORMS)}"
            )
        super().__init__(extractor, timeout_s, equivalence)
        self.aggregate = AGGREGATIONS[aggregation]
        self.to_reward = MODES[mode]
        self.threshold = threshold
        self.max_steps = max_steps
        self.include_prompt_state = include_prompt_state
        self.distance_tokens = distance_tokens
        self.ties_consistent = ties_consistent
        self.volatility_index = volatility_index
        self.curiosity = CURIOSITY_FORMS[form]
        self.curiosity_weight = float(curiosity.get("weight", 0.0))
        self.template = template

    def _branches(self, tokenizer, representatives: list[str]) -> dict[bool, tuple]:
        """Branches and scoring starts per answer, keyed by whether the state ends in a newline."""

        tokenize = partial(encode, tokenizer)

        def build(prefix: list[int]) -> tuple[list[list[int]], list[int]]:
            return build_branches(
                tokenize, self.template, representatives, prefix, self.distance_tokens
            )

        return {True: build([]), False: build(tokenize("\n"))}

    def branch_ids(self, tokenizer, representatives: list[str]) -> dict[str, list]:
        """The token ids this reward builds its branches from, for recomputing D elsewhere.

        `template_ids`: the template alone (where `distance_tokens=answer` starts scoring);
        `answer_ids[k]`: the branch of answer k after a state that ends in a newline;
        `newline_ids`: the unscored prefix put before every branch after any other state.
        """
        answer_ids, _ = self._branches(tokenizer, representatives)[True]
        return {
            "template_ids": encode(tokenizer, self.template),
            "answer_ids": answer_ids,
            "newline_ids": encode(tokenizer, "\n"),
        }

    def _distances(
        self, group: Group, i: int, texts: list[str], ends: list[int], scorer, branches: dict
    ) -> tuple[list[int], torch.Tensor]:
        """State ends and D [T, K] of response i.

        `texts` holds the prompt's last token text, then one text per response token.
        """
        prompt_len = len(group.prompt_ids)
        state_ends = states(prompt_len, ends, self.include_prompt_state)
        chosen = [branches["\n" in texts[end - prompt_len]] for end in state_ends]
        D = scorer.branch_nll(
            group.prompt_ids + group.response_ids[i],
            state_ends,
            [b for b, _ in chosen],
            [s for _, s in chosen],
            group.context_caches[i] if group.context_caches else None,
        )
        return state_ends, torch.stack(D).float()

    def _segment(self, group: Group, tokenizer, out: GroupReward) -> dict[int, list[str]]:
        """Fill step ends (and curiosity when on) of answered responses; return token texts.

        The texts of response i start with the prompt's last token, then one per response token.
        """
        prompt_last = token_texts(tokenizer, group.prompt_ids[-1:]) or ["\n"]
        texts = {}
        for i, cluster in enumerate(out.clusters):
            if cluster < 0:
                continue
            texts[i] = prompt_last + token_texts(tokenizer, group.response_ids[i])
            ends = out.details["step_ends"][i] = step_ends(texts[i][1:], self.max_steps)
            if self.curiosity_weight > 0:
                steps = torch.tensor_split(-group.token_logprobs[i].double(), ends[:-1])
                out.components["curiosity"][i] = self.curiosity.value(list(steps))
        return texts

    def _judge(self, group: Group, scorer: Scorer, texts: dict, out: GroupReward) -> None:
        """Fill distances, Con / Vol, cluster values, verdicts and rewards (K >= 2)."""
        representatives = out.details["representatives"]
        branches = self._branches(scorer.tokenizer, representatives)
        comp, details = out.components, out.details
        for i in texts:
            ends = details["step_ends"][i]
            state_ends, D = self._distances(group, i, texts[i], ends, scorer, branches)
            ratios = distance_ratios(D, out.clusters[i])
            comp["consistency"][i] = consistency(ratios, self.ties_consistent)
            comp["volatility"][i] = volatility(ratios, self.volatility_index)
            comp["num_states"][i] = float(len(state_ends))
            details["state_ends"][i], details["D"][i] = state_ends, D.tolist()
            details["ratios"][i] = ratios.tolist()

        members = [[i for i in texts if out.clusters[i] == c] for c in range(len(representatives))]
        values = [
            self.aggregate([comp["consistency"][i] for i in m], [comp["volatility"][i] for i in m])
            for m in members
        ]
        out.verdicts = [value >= self.threshold for value in values]
        out.group_metrics["pass_frac"] = sum(out.verdicts) / len(values)
        for i in texts:
            value = values[out.clusters[i]]
            out.scores[i] = comp["intrinsic"][i] = value
            out.rewards[i] = self.to_reward(value, self.threshold)
            if self.curiosity_weight > 0:
                out.rewards[i] += self.curiosity_weight * self.curiosity.bonus(comp["curiosity"][i])

    def __call__(self, group: Group, scorer: Scorer) -> GroupReward:
        """Rewards of one group; K <= 1 answer clusters give every response 0."""
        n = group.size
        answers, clusters, representatives = self.answers_and_clusters(group)
        k = len(representatives)
        components = ("consistency", "volatility", "curiosity", "intrinsic", "num_states")
        per_response = ("D", "ratios", "step_ends", "state_ends")
        out = GroupReward(
            rewards=[0.0] * n,
            answers=answers,
            clusters=clusters,
            scores=[0.0 if c >= 0 else NO_ANSWER_SCORE for c in clusters],
            verdicts=[False] * k,
            components={name: [math.nan] * n for name in components},
            group_metrics={"num_answers": float(k)},
            details={name: [None] * n for name in per_response},
        )
        out.details["representatives"] = list(representatives)
        if k >= 2 or self.curiosity_weight > 0:
            texts = self._segment(group, scorer.tokenizer, out)
        if k >= 2:
            self._judge(group, scorer, texts, out)
        return out
