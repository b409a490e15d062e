"""The label-free reward zoo on hand-built groups, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from covo.rewards.base import Group
from covo.rewards.certainty import EntropyReward, SelfCertaintyReward, SequenceLogProbReward
from covo.rewards.controls import FormatReward, RandomReward
from covo.rewards.majority import MajorityReward, VoteShareReward
from covo.rewards.restrain import RestrainReward

torch.set_num_threads(1)


def group(texts, per_token=None, field="token_logprobs", **coords) -> Group:
    """One fake token per per-token value; every per-token statistic defaults to 1.0."""
    per_token = per_token or [[1.0] for _ in texts]
    stats = {
        name: [torch.tensor(v, dtype=torch.float32) for v in per_token]
        if name == field
        else [torch.ones(len(v)) for v in per_token]
        for name in ("token_logprobs", "token_entropy", "token_self_certainty")
    }
    return Group(
        prompt_ids=[1, 2],
        response_ids=[list(range(len(v))) for v in per_token],
        texts=list(texts),
        **stats,
        **coords,
    )


def boxed(*answers):
    return [r"so \boxed{" + a + "}" if a is not None else "I give up" for a in answers]


# vote_share -------------------------------------------------------------------------------


def test_vote_share_is_the_answer_clusters_share_of_the_group():
    out = VoteShareReward()(group(boxed("2", "3", "3.0", None, "2", r"\frac{6}{2}")))
    # clusters: 2 -> {0, 4}, 3 -> {1, 2, 5} (3.0 and 6/2 are 3); N = 6 counts the no-answer
    assert out.clusters == [0, 1, 1, -1, 0, 1]
    assert out.rewards == pytest.approx([2 / 6, 3 / 6, 3 / 6, 0.0, 2 / 6, 3 / 6])
    assert out.verdicts == [False, True]
    assert out.components["vote_share"] == out.rewards


@pytest.mark.parametrize(
    "answers, rewards, verdicts",
    [
        (("7", "5", "5", "7"), [0.5, 0.5, 0.5, 0.5], [True, False]),  # tie: first cluster
        ((None, None), [0.0, 0.0], []),  # no answers
        (("4",), [1.0], [True]),  # N = 1
        (("1", "1", "1"), [1.0, 1.0, 1.0], [True]),  # all equal
    ],
)
def test_vote_share_edge_cases(answers, rewards, verdicts):
    out = VoteShareReward()(group(boxed(*answers)))
    assert out.rewards == rewards
    assert out.verdicts == verdicts


# seq_logprob and entropy ------------------------------------------------------------------


def test_seq_logprob_mean_and_sum():
    logprobs = [[-1.0, -2.0, -3.0], [-0.5], [], [-2.0, -2.0]]
    texts = boxed("1", "2", None, "2")
    mean = SequenceLogProbReward()(group(texts, logprobs))
    total = SequenceLogProbReward(reduction="sum")(group(texts, logprobs))
    # an empty response gets 0 and a NaN component
    assert mean.rewards == pytest.approx([-2.0, -0.5, 0.0, -2.0])
    assert total.rewards == pytest.approx([-6.0, -0.5, 0.0, -4.0])
    assert math.isnan(total.components["seq_logprob"][2])
    # the most likely answered response (-0.5) is in cluster 1
    assert mean.clusters == [0, 1, -1, 1]
    assert mean.verdicts == [False, True]
    with pytest.raises(ValueError, match="reward.reduction"):
        SequenceLogProbReward(reduction="max")


@pytest.mark.parametrize(
    "fraction, entropies",
    [
        (1.0, [2.5, 5.0, 3.0]),  # every token
        (0.5, [2.0, 5.0, 4.0]),  # last ceil(2) = (1, 3); ceil(0.5) = 1 -> 5; ceil(1.5) = (2, 6)
        (0.25, [3.0, 5.0, 6.0]),  # last token of each
    ],
)
def test_entropy_scores_the_last_fraction_of_the_response(fraction, entropies):
    per_token = [[4.0, 2.0, 1.0, 3.0], [5.0], [1.0, 2.0, 6.0]]
    entropy = group(boxed("1", "2", "2"), per_token, "token_entropy")
    out = EntropyReward(last_fraction=fraction)(entropy)
    assert out.components["entropy"] == pytest.approx(entropies)
    assert out.rewards == pytest.approx([-e for e in entropies])


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_out_of_range_last_fraction_is_refused(fraction):
    with pytest.raises(ValueError, match="reward.last_fraction"):
        EntropyReward(last_fraction=fraction)
    with pytest.raises(ValueError, match="reward.last_fraction"):
        SelfCertaintyReward(last_fraction=fraction)


# restrain ---------------------------------------------------------------------------------


def test_restrain_weights_every_answer_by_its_vote_share():
    out = RestrainReward()(group(boxed("2", "2", "2", "3", None)))
    # shares 2: 3/5, 3: 1/5; g(f) = exp(-(f - 1)^2 / (2 * 0.5^2)):
    # g(0.6) = exp(-0.32) = 0.726149, g(0.2) = exp(-1.28) = 0.278037
    # w = 0.726149 / 1.004186 = 0.723122 and 0.276878; prompt weight u = g(0.6) = 0.726149
    assert out.components["pseudo_label_weight"] == pytest.approx(
        [0.723122, 0.723122, 0.723122, 0.276878, 0.0], abs=1e-6
    )
    assert out.rewards == pytest.approx([0.525094] * 3 + [0.201055, 0.0], abs=1e-6)
    assert out.group_metrics == pytest.approx({"prompt_weight": 0.726149, "penalized": 0.0})
    assert out.verdicts == [True, False]


def test_restrain_penalises_groups_without_enough_agreement():
    for answers in (("1", "2", "3", "4"), (None, None, None)):  # top shares 0.25 and 0 < 0.3
        out = RestrainReward()(group(boxed(*answers)))
        assert out.rewards == [-0.5] * len(answers)
        assert out.group_metrics["penalized"] == 1.0
        assert not any(out.verdicts)


def test_restrain_ties_single_answers_and_knobs():
    tie = RestrainReward()(group(boxed("2", "2", "3", "3")))
    # w = 0.5 each; u = g(0.5) = exp(-0.5) = 0.606531
    assert tie.rewards == pytest.approx([0.303265] * 4, abs=1e-6)
    assert tie.verdicts == [True, False]
    assert RestrainReward()(group(boxed("5"))).rewards == [1.0]  # N = 1: g(1) = 1, w = 1
    assert RestrainReward()(group(boxed("1", "1", "1"))).rewards == [1.0, 1.0, 1.0]
    unweighted = RestrainReward(prompt_weighting=False)(group(boxed("2", "2", "3", "3")))
    assert unweighted.rewards == [0.5] * 4
    # a narrow g leaves (almost) all weight on the majority: majority vote
    narrow = RestrainReward(sigma=0.05)(group(boxed("2", "2", "2", "3", None)))
    assert narrow.components["pseudo_label_weight"] == pytest.approx([1, 1, 1, 0, 0], abs=1e-9)
    with pytest.raises(ValueError, match="reward.sigma"):
        RestrainReward(sigma=0.0)
    with pytest.raises(ValueError, match="reward.min_majority_share"):
        RestrainReward(min_majority_share=1.5)


# random and format ------------------------------------------------------------------------


def draws(p, step=0, rank=0, index=0, n=8, texts=None):
    texts = texts or boxed(*[str(i) for i in range(n)])
    return RandomReward(p=p, seed=7)(group(texts, step=step, rank=rank, index=index)).rewards


def test_random_reward_is_a_seeded_coin():
    assert draws(0.0) == [0.0] * 8
    assert draws(1.0) == [1.0] * 8
    assert draws(0.5) == draws(0.5)  # the same step, rank and group: the same draws
    # ... whatever the responses say
    assert draws(0.5, texts=["x"] * 8) == draws(0.5)
    patterns = {tuple(draws(0.5, n=32, step=s, rank=r)) for s in range(3) for r in range(2)}
    assert len(patterns) == 6  # each step and rank draws afresh
    rate = sum(sum(draws(0.3, index=i)) for i in range(500)) / 4000
    assert rate == pytest.approx(0.3, abs=0.03)
    with pytest.raises(ValueError) as err:
        RandomReward(p=1.5)
    assert str(err.value) == "reward.p=1.5: expected a number in [0, 1]"


def test_random_reward_seed_defaults_and_what_it_reports():
    texts = boxed("12", "2", None, "7", *[str(i) for i in range(28)])
    seeded = [RandomReward(p=0.5, seed=s)(group(texts)).rewards for s in (0, 7, 8)]
    assert len({tuple(r) for r in seeded}) == 3  # the seed is part of every group's draws
    default = RandomReward()(group(texts))  # p 0.5 and seed 0 (docs/rewards.md)
    assert default.rewards == seeded[0]
    assert default.answers[:4] == ["12", "2", None, "7"]
    assert default.clusters[:4] == [0, 1, -1, 2]
    assert default.scores == default.rewards and default.components == {"random": default.rewards}
    assert default.verdicts == []  # no cluster passes
    last_digit = RandomReward(equivalence=lambda a, b: a[-1] == b[-1])(group(texts))
    assert last_digit.clusters[:4] == [0, 0, -1, 1]


def test_format_reward_wants_a_final_nonempty_box():
    texts = [r"so \boxed{4}", "the answer is 4", r"\boxed{}", r"\boxed{5", r"\boxed{1}, \boxed{2}"]
    out = FormatReward()(group(texts))
    assert out.rewards == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert out.answers == ["4", None, None, None, "2"]
    # the answers' clusters (4 first, then 2), the rewards as scores and as the logged component
    assert out.clusters == [0, -1, -1, -1, 1]
    assert out.scores == out.components["format"] == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert list(out.components) == ["format"]
    assert FormatReward()(group(["no box"])).rewards == [0.0]  # N = 1
    # an equivalence given in Python clusters the answers (here: every two are equal)
    same = FormatReward(equivalence=lambda a, b: True)(group(texts))
    assert same.clusters == [0, -1, -1, -1, 0]


# what every voting and token-statistic reward reports beside its rewards -------------------


def test_restrain_at_exactly_the_minimum_share_is_not_penalised():
    # RESTRAIN penalises a group whose majority share is *below* the threshold: 3 of 10 is not
    out = RestrainReward(min_majority_share=0.3)(group(boxed(*"1112233445")))
    assert out.group_metrics["penalized"] == 0.0 and out.verdicts[0] is True
    assert (
        RestrainReward(min_majority_share=0.31)(group(boxed(*"1112233445"))).rewards == [-0.5] * 10
    )


def test_restrain_uses_the_answer_equivalence_given():
    # "equal when the last digits are": 12 and 2 form one cluster of 2, 7 one of 1
    last_digit = RestrainReward(equivalence=lambda a, b: a[-1] == b[-1])
    out = last_digit(group(boxed("12", "2", "7")))
    assert out.clusters == [0, 0, 1]
    assert RestrainReward()(group(boxed("12", "2", "7"))).clusters == [0, 1, 2]


@pytest.mark.parametrize(
    "reward,scores",
    [
        (VoteShareReward(), [0.5, 0.25, 0.5, 0.0]),
        (MajorityReward(), [0.5, 0.25, 0.5, 0.0]),
        # shares 1/2 and 1/4: g = exp(-0.5), exp(-1.125); w = g / sum
        (RestrainReward(), [0.651355, 0.348645, 0.651355, 0.0]),
    ],
    ids=["vote_share", "majority", "restrain"],
)
def test_voting_rewards_report_answers_clusters_and_scores(reward, scores):
    out = reward(group(boxed("3", "5", "3", None)))
    assert out.answers == ["3", "5", "3", None]
    assert out.clusters == [0, 1, 0, -1]
    assert out.scores == pytest.approx(scores, abs=1e-6)
    assert out.verdicts == [True, False]


def test_token_statistic_verdict_is_the_cluster_of_the_best_answered_response():
    # log-probs: response 0 (answer 3, cluster 0) is the most likely answered one; the
    # unanswered response 3 is likelier still and must not count
    texts = boxed("3", "5", "3", None)
    out = SequenceLogProbReward()(group(texts, [[-0.1], [-0.5], [-0.9], [-0.01]]))
    assert out.answers == ["3", "5", "3", None] and out.clusters == [0, 1, 0, -1]
    assert out.scores == pytest.approx([-0.1, -0.5, -0.9, -0.01])
    assert out.verdicts == [True, False]
    # the best answered response in cluster 1
    assert SequenceLogProbReward()(group(texts, [[-0.9], [-0.5], [-0.9], [0.0]])).verdicts == [
        False,
        True,
    ]
    # nobody answers: no cluster, no verdict
    silent = SequenceLogProbReward()(group(boxed(None, None), [[-0.1], [-0.2]]))
    assert silent.clusters == [-1, -1] and silent.verdicts == []


def test_refused_knobs_are_named_with_what_is_expected():
    cases = [
        (lambda: RestrainReward(sigma=0.0), "reward.sigma=0.0: expected a number > 0"),
        (
            lambda: RestrainReward(min_majority_share=1.5),
            "reward.min_majority_share=1.5: expected a number in [0, 1]",
        ),
        (lambda: EntropyReward(reduction="max"), "reward.reduction=max: expected mean or sum"),
        (
            lambda: SelfCertaintyReward(last_fraction=0.0),
            "reward.last_fraction=0.0: expected a number in (0, 1]",
        ),
    ]
    for build, message in cases:
        with pytest.raises(ValueError) as err:
            build()
        assert str(err.value) == message
