from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import PeekingMajority, compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

from covo.analysis import score
from covo.answers import AnswerEquivalence
from covo.infra.errors import DataError
from covo.models.loading import build_tiny
from covo.rewards.base import Group, LabelWithheldError, Withheld, label_for
from covo.rewards.certainty import EntropyReward, SelfCertaintyReward, SequenceLogProbReward
from covo.rewards.controls import FormatReward, RandomReward
from covo.rewards.covo.reward import CoVoReward
from covo.rewards.covo.scorer import PrefixSharedScorer
from covo.rewards.ground_truth import GroundTruthReward
from covo.rewards.harmony import SelfHarmonyReward
from covo.rewards.majority import MajorityReward, VoteShareReward
from covo.rewards.restrain import RestrainReward
from covo.rollout.views import declared_views, view_prompts

torch.set_num_threads(1)
REWARD_CONF = Path(__file__).resolve().parents[1] / "conf" / "reward"


def make_group(texts, label=None, certainty=None, entropy=None):
    """Fake tokens: one id per value; per-token values default to 1.0 per response token."""
    certainty = certainty or [[1.0, 1.0] for _ in texts]
    entropy = entropy or certainty
    return Group(
        prompt_ids=[1, 2],
        response_ids=[list(range(len(v))) for v in certainty],
        texts=list(texts),
        token_logprobs=[torch.zeros(len(v)) for v in certainty],
        token_entropy=[torch.tensor(v, dtype=torch.float32) for v in entropy],
        token_self_certainty=[torch.tensor(v, dtype=torch.float32) for v in certainty],
        truth=label,
    )


def boxed(*answers):
    return [r"so \boxed{" + a + "}" if a is not None else "I give up" for a in answers]


def test_majority_rewards_the_largest_cluster():
    group = make_group(boxed("2", "3", "3.0", None, "2", r"\frac{6}{2}"), label="2")
    out = MajorityReward()(group, None)
    # clusters: 2 -> {0, 4}, 3 -> {1, 2, 5}; shares 2/6 and 3/6 of all six responses.
    assert out.clusters == [0, 1, 1, -1, 0, 1]
    assert out.rewards == [0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert out.scores == pytest.approx([2 / 6, 3 / 6, 3 / 6, 0.0, 2 / 6, 3 / 6])
    assert out.verdicts == [False, True]
    assert out.components["majority_share"] == out.scores
    assert out.answers[3] is None


def test_majority_tie_goes_to_the_first_cluster():
    out = MajorityReward()(make_group(boxed("7", "5", "5", "7", "9")), None)
    # counts: 7 -> 2, 5 -> 2, 9 -> 1; cluster of "7" appears first.
    assert out.rewards == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert out.verdicts == [True, False, False]


def test_majority_without_answers_gives_zero():
    out = MajorityReward()(make_group(boxed(None, None)), None)
    assert out.rewards == [0.0, 0.0]
    assert out.scores == [0.0, 0.0]
    assert out.clusters == [-1, -1]
    assert out.verdicts == []


def test_ground_truth_reward():
    group = make_group(boxed(r"\frac{1}{2}", "2", None, "0.5"), label=r"\boxed{1/2}")
    out = GroundTruthReward()(group, None)
    assert out.rewards == [1.0, 0.0, 0.0, 1.0]
    assert out.answers == [r"\frac{1}{2}", "2", None, "0.5"]
    assert out.scores == out.rewards
    assert out.clusters == [0, 1, -1, 0]
    assert out.verdicts == [True, False]
    with pytest.raises(ValueError, match="label"):
        GroundTruthReward()(make_group(boxed("1")), None)


def test_self_certainty_reward():
    texts = [r"\boxed{1}", r"\boxed{2}", "", "no answer", r"\boxed{1.0}"]
    certainty = [[1.0, 2.0, 3.0], [4.0], [], [9.0, 9.0], [0.5, 1.5]]
    out = SelfCertaintyReward()(make_group(texts, certainty=certainty), None)
    # means: (1+2+3)/3 = 2, 4, empty -> 0, 9, (0.5+1.5)/2 = 1.
    assert out.rewards == pytest.approx([2.0, 4.0, 0.0, 9.0, 1.0])
    assert out.scores == out.rewards
    assert out.clusters == [0, 1, -1, -1, 0]
    # the top score 9 has no answer; the best answered response (4) sits in cluster 1.
    assert out.verdicts == [False, True]
    values = out.components["self_certainty"]
    assert values[:2] == pytest.approx([2.0, 4.0]) and math.isnan(values[2])


def test_entropy_reward_is_negative_mean_entropy():
    texts = [r"\boxed{1}", r"\boxed{2}", r"\boxed{2}"]
    entropy = [[0.5, 1.5], [0.2], [3.0, 1.0, 2.0]]
    out = EntropyReward()(make_group(texts, entropy=entropy, certainty=[[0.0]] * 3), None)
    # mean entropies: 1.0, 0.2, 2.0 -> rewards -1.0, -0.2, -2.0; the best (-0.2) is in cluster 1.
    assert out.rewards == pytest.approx([-1.0, -0.2, -2.0])
    assert out.components["entropy"] == pytest.approx([1.0, 0.2, 2.0])
    assert out.verdicts == [False, True]


def test_extractor_choice_changes_answers():
    texts = ["it is 4", r"\boxed{4}"]
    assert MajorityReward(extractor="boxed")(make_group(texts), None).answers == [None, "4"]
    assert MajorityReward(extractor="last_number")(make_group(texts), None).answers == ["4", "4"]


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("ground_truth", GroundTruthReward),
        ("majority", MajorityReward),
        ("self_certainty", SelfCertaintyReward),
        ("entropy", EntropyReward),
    ],
)
def test_reward_configs_instantiate(name, cls):
    shared = AnswerEquivalence()
    reward = instantiate(OmegaConf.load(REWARD_CONF / f"{name}.yaml"), equivalence=shared)
    assert type(reward) is cls
    assert reward.equivalence is shared


PROMPT = (
    "Question: What is 3 + 4?\n"
    "Please reason step by step, and put your final answer within \\boxed{}\n"
)
RESPONSES = [
    "3 + 4 = 7.\nThe answer is: \\boxed{7}",
    "3 + 4 = 8.\nSo it is 8.\nThe answer is: \\boxed{8}",
    "Adding gives 7.\n\\boxed{7}",
    "I think it is 9",
]


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny()


def score_with(reward, loaded, truth):
    """`reward` on RESPONSES as the tiny model reads them; each declared view gets them too."""
    group = score.make_group(loaded, PROMPT, RESPONSES, truth)
    group.views = {
        name: score.make_group(loaded, view_prompts([PROMPT], template)[0], RESPONSES, truth)
        for name, template in declared_views(reward).items()
    }
    return reward(group, PrefixSharedScorer(loaded.model, loaded.tokenizer))


@pytest.mark.parametrize("name", sorted(p.stem for p in REWARD_CONF.glob("*.yaml")))
def test_only_rewards_that_need_labels_are_given_them(name, tiny_model, tmp_path):
    """Every reward config: a label-free reward scores the same with the label withheld; one
    that declares `needs_labels` is given it."""
    reward = instantiate(compose_config("train", [f"reward={name}"], tmp_path).reward)
    truth = label_for(reward, "7")
    if getattr(reward, "needs_labels", False):
        assert truth == "7"
        expected = {"ground_truth": [1.0, 0.0, 1.0, 0.0], "negated_ground_truth": [-1.0, 0, -1, 0]}
        assert score_with(reward, tiny_model, truth).rewards == expected[name]
        return
    assert truth == Withheld(type(reward).__name__)
    withheld = score_with(reward, tiny_model, truth)
    given = score_with(reward, tiny_model, "7")
    assert repr(withheld) == repr(given)  # NaN components compare equal as text
    assert len(withheld.rewards) == len(RESPONSES)


def test_a_label_free_reward_that_reads_the_label_fails_naming_itself():
    reward = PeekingMajority()
    group = make_group(boxed("7", "8"), label=label_for(reward, "7"))
    with pytest.raises(LabelWithheldError, match="PeekingMajority read Group.label"):
        reward(group, None)


def test_negated_ground_truth_gives_correct_answers_minus_one():
    group = make_group(boxed("3", "4", None), label="3")
    out = GroundTruthReward(extractor="boxed", scale=-1.0)(group, None)
    assert out.rewards == [-1.0, 0.0, 0.0]
    assert out.components["correct"] == [1.0, 0.0, 0.0]
    assert out.verdicts == [True, False]


def test_ground_truth_without_a_label_says_so():
    with pytest.raises(DataError) as err:
        GroundTruthReward()(make_group(boxed("7")), None)
    assert str(err.value) == "GroundTruthReward needs labels: this item has no answer"


def test_answer_settings_are_checked_by_name_and_reach_the_equivalence():
    cases = [
        (
            {"extractor": "first_box"},
            "reward.extractor=first_box: expected one of released_boxed, boxed, last_number, "
            "boxed_or_last_number",
        ),
        ({"timeout_s": 0.0}, "reward.timeout_s=0.0: expected a number > 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as err:
            MajorityReward(**kwargs)
        assert str(err.value) == message
    assert MajorityReward(timeout_s=0.5).equivalence.timeout_s == 0.5  # under a second is fine
    assert MajorityReward().equivalence.timeout_s == 2.0


def test_every_reward_parses_answers_for_two_seconds_by_default():
    # math-verify's parse limit: each reward class passes its own default on
    kinds = [MajorityReward, VoteShareReward, RestrainReward, GroundTruthReward, EntropyReward]
    kinds += [SelfCertaintyReward, SequenceLogProbReward, RandomReward, FormatReward]
    kinds += [SelfHarmonyReward, CoVoReward]
    assert {kind.__name__: kind().equivalence.timeout_s for kind in kinds} == {
        kind.__name__: 2.0 for kind in kinds
    }
