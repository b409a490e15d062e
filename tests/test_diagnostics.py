from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from covo.answers import AnswerEquivalence, cluster_answers
from covo.metrics.diagnostics import (
    auroc,
    consistency_volatility_values,
    distance_curves,
    reward_diagnostics,
)
from covo.rewards.base import GroupReward

torch.set_num_threads(1)
NAN = math.nan


EQ = AnswerEquivalence()


def group(answers, scores, verdicts=None, **fields) -> GroupReward:
    clusters, reps = cluster_answers(answers, EQ)
    return GroupReward(
        rewards=[0.0] * len(answers),
        answers=answers,
        clusters=clusters,
        scores=scores,
        verdicts=verdicts if verdicts is not None else [False] * len(reps),
        **fields,
    )


@pytest.fixture(scope="module")
def batch():
    """Four prompts; the comments give clusters, their correctness and the verdicts."""
    results = [
        # one cluster {1} (correct): left out of reward accuracy
        group(["1", "1", "1"], [0.0, 0.0, 0.0], [True]),
        # {2: 0, 2}, {3: 1}; correct [T, F]; verdicts [T, T]; majority = cluster 0
        group(["2", "3", "2", None], [0.6, 0.3, 0.6, -1.0], [True, True]),
        # {4: 0, 1}, {5: 2}, {6: 3}; correct [F, T, F]; verdicts [F, T, F]; majority = cluster 0
        group(["4", "4", "5", "6"], [0.2, 0.2, 0.9, 0.1], [False, True, False]),
        # no answers
        group([None, None], [-1.0, -1.0], []),
    ]
    return results, ["1", "2", "5", "7"]


def test_auroc_with_ties_matches_pair_count_and_torchmetrics():
    scores = [0.9, 0.5, 0.5, 0.5, 0.1]
    positives = [True, True, False, False, False]
    # positives {0.9, 0.5} x negatives {0.5, 0.5, 0.1}: 0.9 wins 3; 0.5 ties 2 (1/2 each), wins 1
    # -> (3 + 0.5 + 0.5 + 1) / 6 = 5/6
    assert auroc(scores, positives) == pytest.approx(5 / 6)
    reference = binary_auroc(torch.tensor(scores), torch.tensor(positives).long())
    assert auroc(scores, positives) == pytest.approx(reference.item())
    assert math.isnan(auroc([0.1, 0.2], [True, True]))


def test_reward_accuracy_excludes_single_cluster_prompts(batch):
    metrics = reward_diagnostics(*batch, EQ)
    # prompt 2: cluster 0 T == T, cluster 1 T != F -> 1 of 2; prompt 3: 3 of 3 -> 4 / 5
    assert metrics["diag/reward_accuracy"] == pytest.approx(0.8)
    # majority verdicts: prompt 2 [T, F] vs [T, F] -> 2; prompt 3 [T, F, F] vs [F, T, F] -> 1
    # -> 3 / 5
    assert metrics["diag/majority_reward_accuracy"] == pytest.approx(0.6)


def test_auroc_over_batch_counts_no_answer_as_incorrect(batch):
    metrics = reward_diagnostics(*batch, EQ)
    # positives: 0, 0, 0 (prompt 1), 0.6, 0.6 (prompt 2), 0.9 (prompt 3)
    # negatives: 0.3, -1 (prompt 2), 0.2, 0.2, 0.1 (prompt 3), -1, -1 (prompt 4)
    # each 0 beats the three -1 -> 9; each 0.6 and the 0.9 beat all 7 -> 21; 30 / (6 * 7)
    assert metrics["diag/auroc"] == pytest.approx(30 / 42)


def test_label_accuracy_differs_from_majority(batch):
    metrics = reward_diagnostics(*batch, EQ)
    # top by mean score: {1} T, {2} T, {5} (0.9) T, none F -> 3 / 4
    # majority: {1} T, {2} T, {4} (2 votes) F, none F -> 2 / 4
    assert metrics["diag/label_accuracy"] == pytest.approx(0.75)
    assert metrics["diag/majority_label_accuracy"] == pytest.approx(0.5)


def test_label_accuracy_ties_go_to_earliest_cluster():
    results = [group(["7", "8"], [0.5, 0.5], [True, True])]
    # mean scores tie and sizes tie: both pick cluster 0 = "7", but the label is 8
    metrics = reward_diagnostics(results, ["8"], EQ)
    assert metrics["diag/label_accuracy"] == 0.0
    assert metrics["diag/majority_label_accuracy"] == 0.0


def test_answer_count_and_entropy():
    results = [
        group(["1", "1", "2", "3"], [0.0] * 4),  # cluster sizes [2, 1, 1]
        group([None, None], [0.0, 0.0]),  # no answers: 0 clusters, no entropy
    ]
    metrics = reward_diagnostics(results, ["1", "1"], EQ)
    assert metrics["diag/num_answers"] == pytest.approx(1.5)  # (3 + 0) / 2
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # = 1.5 ln 2
    assert metrics["diag/answer_entropy"] == pytest.approx(expected)


def test_undefined_entries_are_omitted():
    # one cluster, all correct: no reward accuracy, no AUROC
    metrics = reward_diagnostics([group(["3", "3"], [0.0, 0.0], [True])], ["3"], EQ)
    assert set(metrics) == {
        "diag/label_accuracy",
        "diag/majority_label_accuracy",
        "diag/num_answers",
        "diag/answer_entropy",
    }
    assert reward_diagnostics([group(["3"], [0.0])], [None], EQ) == {}


def test_verdict_shares_of_the_batch(batch):
    metrics = reward_diagnostics(*batch, EQ)
    # judged clusters: correct {2} passed, {5} passed -> 2 / 2;
    # wrong {3} passed, {4} and {6} rejected -> 2 / 3
    assert metrics["diag/correct_pass_rate"] == 1.0
    assert metrics["diag/wrong_reject_rate"] == pytest.approx(2 / 3)
    assert metrics["diag/balanced_reward_accuracy"] == pytest.approx(5 / 6)
    # passed {2} (2 members, correct), {3} (1, wrong), {5} (1, correct)
    assert metrics["diag/pass_precision"] == pytest.approx(2 / 3)
    assert metrics["diag/singleton_pass_share"] == pytest.approx(2 / 3)


def test_rejecting_every_cluster_is_balanced_at_one_half():
    # one correct answer "1" among four: rejecting all is right about the three wrong ones
    answers = ["1", "2", "3", "4"]
    reject_all = reward_diagnostics([group(answers, [0.0] * 4, [False] * 4)], ["1"], EQ)
    assert reject_all["diag/reward_accuracy"] == pytest.approx(3 / 4)
    assert reject_all["diag/balanced_reward_accuracy"] == pytest.approx(0.5)
    assert "diag/pass_precision" not in reject_all  # nothing passed
    pass_all = reward_diagnostics([group(answers, [0.0] * 4, [True] * 4)], ["1"], EQ)
    assert pass_all["diag/reward_accuracy"] == pytest.approx(1 / 4)
    assert pass_all["diag/balanced_reward_accuracy"] == pytest.approx(0.5)
    assert pass_all["diag/pass_precision"] == pytest.approx(1 / 4)
    assert pass_all["diag/singleton_pass_share"] == 1.0


def test_verdict_shares_pool_clusters_over_prompts():
    results = [
        # correct {1} passed, wrong {2, 2} passed
        group(["1", "2", "2"], [0.0] * 3, [True, True]),
        # correct {5} rejected, wrong {6}, {7}, {8} rejected
        group(["5", "6", "7", "8"], [0.0] * 4, [False] * 4),
    ]
    metrics = reward_diagnostics(results, ["1", "5"], EQ)
    # pooled: correct 1 of 2 passed, wrong 3 of 4 rejected -> (1/2 + 3/4) / 2 = 5/8;
    # per prompt first would give ((1 + 0) / 2 + (0 + 1) / 2) / 2 = 1/2
    assert metrics["diag/balanced_reward_accuracy"] == pytest.approx(5 / 8)
    assert metrics["diag/reward_accuracy"] == pytest.approx(4 / 6)
    assert metrics["diag/pass_precision"] == pytest.approx(1 / 2)
    assert metrics["diag/singleton_pass_share"] == pytest.approx(1 / 2)


def test_distance_curves_bin_trajectories_of_different_length():
    ratios = [[0.8, 0.6], [1.2, 1.0, 0.9, 0.5], [1.5, 1.1, 0.7], None]
    results = [
        group(["3", "3", "4", None], [0.0] * 4, details={"ratios": ratios}),
        group(["3", "3"], [0.0, 0.0], details={"ratios": [None, None]}),  # K = 1: not scored
    ]
    curves = distance_curves(results, ["3", "3"], EQ, bins=4)
    assert curves["bin_centers"] == [0.125, 0.375, 0.625, 0.875]
    # correct, T = 2: positions 1/2, 1 -> bins 1, 3; T = 4: positions 1/4 .. 1 -> bins 0 .. 3
    # bin 1 holds 0.8 and 1.0 -> 0.9; bin 3 holds 0.6 and 0.5 -> 0.55
    assert curves["correct_count"] == [1, 2, 1, 2]
    assert curves["correct_mean"] == pytest.approx([1.2, 0.9, 0.9, 0.55])
    assert curves["correct_trajectories"] == 2
    # incorrect, T = 3: positions 1/3, 2/3, 1 -> bins 1, 2, 3; bin 0 empty
    assert curves["incorrect_count"] == [0, 1, 1, 1]
    assert math.isnan(curves["incorrect_mean"][0])
    assert curves["incorrect_mean"][1:] == pytest.approx([1.5, 1.1, 0.7])
    assert curves["incorrect_trajectories"] == 1


def test_distance_curves_bin_edges_are_exact():
    # T = 10, bins = 10: position (i + 1) / 10 falls in bin i (float 0.3 * 10 would overshoot)
    results = [group(["3"], [0.0], details={"ratios": [[float(i) for i in range(10)]]})]
    curves = distance_curves(results, ["3"], EQ, bins=10)
    assert curves["correct_count"] == [1] * 10
    assert curves["correct_mean"] == pytest.approx([float(i) for i in range(10)])


def test_consistency_volatility_split_by_correctness():
    components = {"consistency": [1.0, 0.5, 0.0, NAN], "volatility": [0.0, 0.25, 1.0, NAN]}
    results = [
        group(["3", "3", "4", None], [0.0] * 4, components=components),
        group(["3"], [0.0]),  # a reward without these components adds nothing
    ]
    values = consistency_volatility_values(results, ["3", "3"], EQ)
    assert values == {
        "consistency/correct": [1.0, 0.5],
        "consistency/incorrect": [0.0],
        "volatility/correct": [0.0, 0.25],
        "volatility/incorrect": [1.0],
    }
