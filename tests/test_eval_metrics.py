from __future__ import annotations

import math

import pytest

from covo.answers import AnswerEquivalence
from covo.eval.grading import ChoiceGrader, MathGrader, choice_label, extract_choice
from covo.eval.metrics import item_metrics, maj_at_k, majority_vote, mean_metrics, pass_at_k


def equal(a: str, b: str) -> bool:
    return a == b


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (1, 0.4),  # 1 - C(3,1)/C(5,1) = 1 - 3/5
        (2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (4, 1.0),  # n - c = 3 < 4: every 4-subset holds a correct sample
        (5, 1.0),
    ],
)
def test_pass_at_k_n5_c2(k, expected):
    assert pass_at_k(5, 2, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_edges_and_large_n():
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(1, 1, 1) == 1.0
    # n = 1000, c = 1, k = 10: C(999,10)/C(1000,10) = 990/1000, so pass@10 = 0.01
    assert pass_at_k(1000, 1, 10) == pytest.approx(0.01, rel=1e-12)
    # agrees with the exact integer formula where both are representable
    exact = 1 - math.comb(200 - 37, 16) / math.comb(200, 16)
    assert pass_at_k(200, 37, 16) == pytest.approx(exact, rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_majority_vote_ties_go_to_the_answer_seen_first():
    answers = ["3", "4", "4", "3", "5"]
    correct = [False, True, True, False, False]
    assert majority_vote(answers, equal) == 0  # "3" and "4" tie 2-2; "3" came first
    assert maj_at_k(answers, correct, 2, equal) == 0.0  # "3" vs "4", 1-1 -> "3"
    assert maj_at_k(answers, correct, 3, equal) == 1.0  # "4" wins 2-1
    assert maj_at_k(answers, correct, 4, equal) == 0.0  # 2-2 tie -> "3"
    assert maj_at_k(answers, correct, 5, equal) == 0.0  # still 2-2, "5" has 1


def test_majority_vote_skips_missing_answers_and_clusters_equivalent_ones():
    assert majority_vote([None, None, "7"], equal) == 2
    assert majority_vote([None, None], equal) is None
    assert maj_at_k([None, None], [False, False], 2, equal) == 0.0
    # 0.5 and 1/2 form one cluster of two, which beats "2"
    answers, correct = ["2", "0.5", "1/2"], [False, True, True]
    assert maj_at_k(answers, correct, 3, AnswerEquivalence()) == 1.0
    assert maj_at_k(answers, correct, 3, equal) == 0.0  # three singletons: "2" first


def test_item_metrics_and_their_mean():
    answers, correct = ["5", "4", "5", None], [True, False, True, False]
    metrics = item_metrics(answers, correct, [1, 2, 4], equal)
    # n=4, c=2: pass@1 = 2/4; pass@2 = 1 - C(2,2)/C(4,2) = 1 - 1/6; pass@4 = 1
    # maj@2: "5" vs "4" tie -> "5" correct; maj@4: "5" twice
    assert metrics == pytest.approx(
        {"pass@1": 0.5, "pass@2": 5 / 6, "pass@4": 1.0, "maj@2": 1.0, "maj@4": 1.0}
    )
    assert mean_metrics([{"pass@1": 1.0}, {"pass@1": 0.0}, {"pass@1": 0.5}]) == {"pass@1": 0.5}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("reasoning...\nAnswer: (B)", "B"),
        ("reasoning...\nAnswer: **C**", "C"),
        ("**Answer:** D", "D"),
        ("**Answer**: E", "E"),
        ("Answer: B) a library", "B"),
        ("so\nanswer: A", "A"),
        ("Final answer: J.", "J"),
        ("Answer: $\\boxed{C}$", "C"),
        ("Answer: A\nwait, no.\nAnswer: C", "C"),  # the last line counts
        ("no choice given", None),
        ("The answer is B", None),  # free text is not read: only `Answer: X` lines
        ("Answer: a dog", None),  # lower-case letters are words, not options
        ("Answer: Because B is right", None),
        ("Answer: K", None),  # options run A-J
        ("Answer:\nB", None),  # the letter must be on the answer line
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_choice_labels_and_grader():
    assert [choice_label(x) for x in ["B", " (C) ", "\\boxed{D}"]] == ["B", "C", "D"]
    with pytest.raises(ValueError, match="not a letter"):
        choice_label("bank")
    grader = ChoiceGrader()
    gold = grader.parse_label("\\boxed{A}")
    assert grader.is_correct(grader.extract("Answer: (A)"), gold)
    assert not grader.is_correct(grader.extract("The answer is A"), gold)


def test_math_grader_compares_extracted_answers_only():
    grader = MathGrader("boxed_or_last_number")
    gold = grader.parse_label("\\boxed{\\frac{1}{2}}")
    assert gold == "\\frac{1}{2}"
    assert grader.is_correct(grader.extract("so it is 0.5"), gold)
    assert grader.is_correct(grader.extract("\\boxed{1/2}, not 3"), gold)
    assert not grader.is_correct(grader.extract("one half"), gold)  # no number: no answer
    assert MathGrader("boxed").extract("so it is 0.5") is None
