"""CoVo: reward answer clusters whose trajectories lean towards their own answer early and stay.

Glue between answer clustering, step segmentation, the scorer (distance matrices) and the
statistics in `covo_stats` (docs/covo.md, Answers and clusters to Curiosity bonus). Every
paper / released-code difference is a constructor knob; `conf/reward/covo.yaml` and
`covo_paper.yaml` set the two readings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial

import torch

from covo.answers import AnswerEquivalence
from covo.infra.checks import INT_GE1, at_least, between, check, choice, number, optional
from covo.rewards.answered import AnswerClustering
from covo.rewards.base import Group, GroupReward, Scorer
from covo.rewards.covo.segmentation import COLON_MERGES, states, step_ends
from covo.rewards.covo.select import SELECTIONS, cluster_values
from covo.rewards.covo.stats import (
    AGGREGATIONS,
    CURIOSITY_FORMS,
    VOLATILITY_OFFSETS,
    consistency,
    distance_ratios,
    volatility,
)

CURIOSITY_OFF = {"form": "released", "weight": 0.0}  # `curiosity=None`

# Below every aggregation's range (linear RiL >= -1, the others >= 0): answerless responses
# rank last for AUROC.
NO_ANSWER_SCORE = -1.0


def _binary(value: float, passed: bool) -> float:
    return float(passed)


def _continuous(value: float, passed: bool) -> float:
    return value


# (cluster value, cluster passed) -> reward
MODES: dict[str, Callable[[float, bool], float]] = {"binary": _binary, "continuous": _continuous}


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
    distance_tokens: str,
) -> tuple[list[list[int]], list[int]]:
    """Branch ids `tokenize(template + y_k + "}")` per answer and where scoring starts in each.

    The branch text is tokenised on its own: after a state that ends in a newline this matches
    tokenising state and branch together.
    """
    template_ids = tokenize(template)
    branches = [tokenize(template + answer + "}") for answer in representatives]
    return branches, [SCORED_FROM[distance_tokens](template_ids, ids) for ids in branches]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` on its own, without special tokens."""
    return tokenizer.encode(text, add_special_tokens=False)


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Decoded text of each token on its own."""
    return tokenizer.batch_decode(
        [[t] for t in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )


def glued_newline(tokenizer, text: str, newline: list[int]) -> list[int] | None:
    """Ids of `text + "\\n"` where the tokenizer merges that newline into `text`'s tokens, else
    None (also for a token that holds part of a character)."""
    glued = encode(tokenizer, text + "\n")
    merged = glued != encode(tokenizer, text) + newline
    return glued if merged and "\ufffd" not in text else None


class CoVoReward(AnswerClustering):
    """Consistency and volatility of intermediate states, aggregated per answer cluster.

    Knobs (docs/covo.md, Paper vs released code; the defaults are the released code's):
    `extractor` (a key of `covo.answers.EXTRACTORS`), `colon_merge` (`pairs` | `chains`, see
    `covo.rewards.covo.segmentation`), `aggregation` (a key of `AGGREGATIONS`), `mode` (`binary`:
    1 when the cluster passes, see `select`; `continuous`: the value), `include_prompt_state`,
    `distance_tokens` (`answer` | `template_and_answer`), `newline_scored` (with
    `template_and_answer`: the token holding the newline before the template is scored too),
    `ties_consistent`, `volatility_index` (`released` | `paper`), `curiosity`
    (`{"form": "released" | "paper", "weight": w}`; w = 0 turns it off).

    Guards that neither reading has (off by default; `covo.rewards.covo.select`):
    `min_states` (a trajectory with fewer states takes no part in its cluster's value; a
    cluster with no longer member has no value: it fails, its members get reward 0 and score
    `NO_ANSWER_SCORE`), `short_penalty` (None, or the whole reward of every such short
    trajectory in a judged group, no curiosity added), `select` (`threshold`: every cluster
    with value >= `threshold` passes; `top1`: only the highest, ties to the larger cluster,
    then the earliest).

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
        extractor: str = "released_boxed",
        aggregation: str = "vector",
        mode: str = "binary",
        threshold: float = 0.5,
        max_steps: int = 15,
        colon_merge: str = "pairs",
        include_prompt_state: bool = False,
        distance_tokens: str = "template_and_answer",
        newline_scored: bool = True,
        ties_consistent: bool = False,
        volatility_index: str = "released",
        curiosity: Mapping | None = None,
        min_states: int = 1,
        short_penalty: float | None = None,
        select: str = "threshold",
        template: str = "The answer is: \\boxed{",
        timeout_s: float = 2.0,
        equivalence: AnswerEquivalence | None = None,
    ):
        for name, value, valid in [
            ("aggregation", aggregation, AGGREGATIONS),
            ("mode", mode, MODES),
            ("colon_merge", colon_merge, COLON_MERGES),
            ("distance_tokens", distance_tokens, SCORED_FROM),
            ("volatility_index", volatility_index, VOLATILITY_OFFSETS),
            ("select", select, SELECTIONS),
        ]:
            check(f"reward.{name}", value, *choice(*valid))
        # cluster values: RiV, Con and 1 - Vol lie in [0, 1], RiL in [-1, 1]
        check("reward.threshold", threshold, between(-1.0, 1.0), "a number in [-1, 1]")
        check("reward.max_steps", max_steps, *INT_GE1)
        check("reward.min_states", min_states, *INT_GE1)
        check("reward.short_penalty", short_penalty, optional(number), "null or a number")
        curiosity = CURIOSITY_OFF if curiosity is None else curiosity
        form = curiosity["form"]
        check("reward.curiosity.form", form, *choice(*CURIOSITY_FORMS))
        check("reward.curiosity.weight", curiosity["weight"], at_least(0.0), "a number >= 0")
        super().__init__(extractor, timeout_s, equivalence)
        self.aggregate = AGGREGATIONS[aggregation]
        self.to_reward = MODES[mode]
        self.threshold = threshold
        self.max_steps = max_steps
        self.colon_merge = colon_merge
        self.include_prompt_state = include_prompt_state
        self.distance_tokens = distance_tokens
        self.newline_scored = newline_scored
        self.ties_consistent = ties_consistent
        self.volatility_index = volatility_index
        self.curiosity = CURIOSITY_FORMS[form]
        self.curiosity_weight = float(curiosity["weight"])
        self.template = template
        self.min_states = min_states
        self.short_penalty = short_penalty
        self.select = select
        self.pass_clusters = SELECTIONS[select]

    def branch_ids(self, tokenizer, representatives: list[str]) -> dict[str, list]:
        """The token ids this reward builds its branches from, for recomputing D elsewhere.

        `template_ids`: the template alone (where `distance_tokens=answer` starts scoring);
        `answer_ids[k]`: the branch of answer k after a state that ends in a newline and
        `scored_from[k]` where its scored tokens start; `newline_ids`: the prefix put before
        every branch after any other state.
        """
        tokenize = partial(encode, tokenizer)
        answer_ids, scored_from = build_branches(
            tokenize, self.template, representatives, self.distance_tokens
        )
        return {
            "template_ids": tokenize(self.template),
            "answer_ids": answer_ids,
            "scored_from": scored_from,
            "newline_ids": tokenize("\n"),
        }

    def _distances(
        self, group: Group, i: int, texts: list[str], ends: list[int], scorer, branch_ids: dict
    ) -> tuple[list[int], torch.Tensor]:
        """State ends and D [T, K] of response i.

        `texts` holds the prompt's last token text, then one text per response token. A state
        whose last token holds no newline gets `newline_ids` before its branches. With
        `newline_scored` (and the template scored) the token that holds the newline between
        state and template is scored too, as in the released code's text `state + "\\n" + ...`:
        the state's own last token when it holds the newline, else the newline put there, or
        the token the tokenizer makes of the state's last token and that newline (Qwen: `}` and
        `\\n` make `}\\n`), which then replaces that last token.
        """
        prompt_len = len(group.prompt_ids)
        context = group.prompt_ids + group.response_ids[i]
        state_ends = states(prompt_len, ends, self.include_prompt_state)
        plain, starts = branch_ids["answer_ids"], branch_ids["scored_from"]
        newline = branch_ids["newline_ids"]
        score_newline = self.newline_scored and self.distance_tokens == "template_and_answer"
        cuts, branches, scored_from = [], [], []
        for end in state_ends:
            last = texts[end - prompt_len]
            cut, prefix = end, []
            if "\n" in last:
                if score_newline:
                    cut, prefix = end - 1, context[end - 1 : end]
            elif score_newline and (glued := glued_newline(scorer.tokenizer, last, newline)):
                cut, prefix = end - 1, glued
            else:
                prefix = newline
            cuts.append(cut)
            branches.append([prefix + b for b in plain])
            scored_from.append([0 if score_newline else len(prefix) + s for s in starts])
        cache = group.context_caches[i] if group.context_caches else None
        D = scorer.branch_nll(context, cuts, branches, scored_from, cache)
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
            ends = step_ends(texts[i][1:], self.max_steps, self.colon_merge)
            out.details["step_ends"][i] = ends
            if self.curiosity_weight > 0:
                steps = torch.tensor_split(-group.token_logprobs[i].double(), ends[:-1])
                out.components["curiosity"][i] = self.curiosity.value(list(steps))
        return texts

    def _judge(self, group: Group, scorer: Scorer, texts: dict, out: GroupReward) -> None:
        """Fill distances, Con / Vol, cluster values, verdicts and rewards (K >= 2)."""
        representatives = out.details["representatives"]
        branch_ids = self.branch_ids(scorer.tokenizer, representatives)
        comp, details = out.components, out.details
        for i in texts:
            ends = details["step_ends"][i]
            state_ends, D = self._distances(group, i, texts[i], ends, scorer, branch_ids)
            ratios = distance_ratios(D, out.clusters[i])
            comp["consistency"][i] = consistency(ratios, self.ties_consistent)
            comp["volatility"][i] = volatility(ratios, self.volatility_index)
            comp["num_states"][i] = float(len(state_ends))
            details["state_ends"][i], details["D"][i] = state_ends, D.tolist()
            details["ratios"][i] = ratios.tolist()
        self._reward_clusters(texts, out)

    def _reward_clusters(self, texts: dict, out: GroupReward) -> None:
        """Cluster values, verdicts and rewards from the answered responses' Con / Vol."""
        comp, states = out.components, out.components["num_states"]
        k = len(out.details["representatives"])
        members = [[i for i in texts if out.clusters[i] == c] for c in range(k)]
        cons, vols = comp["consistency"], comp["volatility"]
        values = cluster_values(members, cons, vols, states, self.min_states, self.aggregate)
        out.verdicts = self.pass_clusters(values, [len(m) for m in members], self.threshold)
        out.group_metrics["pass_frac"] = sum(out.verdicts) / len(values)
        for i in texts:
            value, passed = values[out.clusters[i]], out.verdicts[out.clusters[i]]
            if value is not None:
                out.scores[i] = comp["intrinsic"][i] = value
                out.rewards[i] = self.to_reward(value, passed)
                if self.curiosity_weight > 0:
                    bonus = self.curiosity.bonus(comp["curiosity"][i])
                    out.rewards[i] += self.curiosity_weight * bonus
            else:
                out.scores[i] = NO_ANSWER_SCORE
            if self.short_penalty is not None and states[i] < self.min_states:
                out.rewards[i] = float(self.short_penalty)

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
