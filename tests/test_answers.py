from __future__ import annotations

import threading

import math_verify
import pytest

from covo.answers import (
    EXTRACTORS,
    AnswerEquivalence,
    cluster_answers,
    extract_boxed,
    extract_boxed_or_last_number,
    extract_last_number,
    extract_released_boxed,
    get_extractor,
    normalize_answer,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so the answer is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"first \boxed{1}, corrected: \boxed{2}", "2"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\fbox{7}", "7"),
        (r"\fbox{1} then \boxed{2}", "2"),
        (r"$\boxed 5$.", "5"),
        (r"\boxed {x+1}", "x+1"),
        # only the last box counts: cut off, it is no answer (never the earlier box)
        (r"\boxed{3} and a cut-off \boxed{4", None),
        (r"So \boxed{3}. Then \boxed{\frac{1", None),
        (r"\boxed{ }", None),
        (r"\boxed{}", None),
        (r"\boxed{ 5 }", "5"),
        (r"\boxed 5, so {x}", "5"),
        ("no answer here, 42", None),
        (r"ends in \boxed", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# What the released code's last-box rule returns, worked out by hand from that rule: the last
# `\boxed` (`\fbox` only without any `\boxed`), up to the first `}` that balances the braces
# counted from the command on; the box's content as written.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{5}.", "5"),
        (r"first \boxed{1}, corrected: \boxed{2}", "2"),
        (r"\boxed{\frac{1}{2}} and more }", r"\frac{1}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        # a truncated response: no box, so no answer (not the last number 7)
        ("Add 2 and 3 to get 5, and then multiply by 7 to get", None),
        # an unclosed last box is no answer, whatever came before it
        (r"So \boxed{3}. Then \boxed{\frac{1", None),
        (r"\boxed{3} and \boxed{", None),
        # an empty box (echoing the prompt's "within \boxed{}") is an answer: ""
        (r"I will put it within \boxed{}.", ""),
        (r"\boxed{ 5 }", " 5 "),
        (r"\fbox{7}", "7"),
        (r"\fbox{1} then \boxed{2}", "2"),
        (r"\boxed{2} then \fbox{3}", "2"),
        (r"\boxed {x+1}", "x+1"),
        # no brace after the command: the answer runs on to the next balanced group
        (r"\boxed 5, so {x} and {y}", " 5, so {x}"),
        (r"\boxed 5.", None),
        ("the answer is 42", None),
    ],
)
def test_extract_released_boxed(text, expected):
    assert extract_released_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so x = -3.", "-3"),
        ("a total of 1,234 apples", "1234"),
        ("half is 0.5 and", "0.5"),
        ("3/4 of them", "3/4"),
        ("about .5 left", "0.5"),
        ("pages 1-3", "3"),
        ("f(x) = x^2-5", "5"),
        ("value (-2)", "-2"),
        ("version v2 only", None),
        ("nothing", None),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_boxed_or_last_number_prefers_the_box():
    assert extract_boxed_or_last_number(r"3 apples, so \boxed{4} and then 5") == "4"
    assert extract_boxed_or_last_number("3 apples, then 5") == "5"
    assert extract_boxed_or_last_number("no digits") is None


def test_get_extractor():
    assert {name: get_extractor(name) for name in EXTRACTORS} == EXTRACTORS
    valid = "released_boxed, boxed, last_number, boxed_or_last_number"
    with pytest.raises(ValueError, match=f"'boxd'.*{valid}"):
        get_extractor("boxd")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("$2.50$", "2.5"),
        (" 2.0 ", "2"),
        ("-0.500", "-0.5"),
        (".5", "0.5"),
        ("10.", "10"),
        ("+3", "3"),
        ("1,000,000", "1000000"),
        ("1{,}000", "1000"),
        (r"1\,000", "1000"),
        ("1,2", "1,2"),
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"x \leftarrow y", r"x\leftarrowy"),
        (r"\text{(A)}", "(A)"),
        ("x + 1", "x+1"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (r"\frac{1}{2}", "0.5", True),
        ("1/2", r"\frac12", True),
        ("1,000", "1000", True),
        ("x+1", "1+x", True),
        (r"\sqrt{8}", r"2\sqrt{2}", True),
        ("A", r"\text{(A)}", True),
        ("Yes", "yes", True),
        ("2", "3", False),
        ("0.333", "1/3", False),
        # sympy reads bare words as products of symbols; these must stay different.
        ("yes", "sey", False),
    ],
)
def test_equivalent(a, b, expected):
    eq = AnswerEquivalence()
    assert eq.equivalent(a, b) is expected
    assert eq.equivalent(b, a) is expected


def test_equivalence_fast_path_and_cache(monkeypatch):
    calls = []
    real_verify = math_verify.verify

    def counting_verify(*args, **kwargs):
        calls.append(args)
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(math_verify, "verify", counting_verify)
    eq = AnswerEquivalence()
    assert eq.equivalent("$2.50$", "2.5") and calls == []
    assert eq.equivalent(r"\frac{1}{2}", "0.5") and len(calls) == 1
    assert eq(r"0.5", r"\frac{1}{2}") and len(calls) == 1


def test_equivalence_cache_is_bounded():
    eq = AnswerEquivalence(max_cache=2)
    for a, b in [("1", "2"), ("1", "3"), ("1", "4")]:
        assert not eq.equivalent(a, b)
    # the oldest verdict ("1", "2") was dropped to stay within two entries.
    assert list(eq._verdicts) == [("1", "3"), ("1", "4")]
    assert len(eq._parsed) == 2


def test_equivalence_outside_the_main_thread():
    results = []
    worker = threading.Thread(
        target=lambda: results.append(AnswerEquivalence().equivalent(r"\frac{1}{2}", "0.5"))
    )
    worker.start()
    worker.join()
    assert results == [True]


def test_is_correct():
    eq = AnswerEquivalence()
    assert eq.is_correct("0.5", r"The answer is \boxed{\frac{1}{2}}")
    assert eq.is_correct("-3", "-3")
    assert not eq.is_correct("3", r"\boxed{-3}")
    assert not eq.is_correct(None, "3")


def test_cluster_answers_in_sample_order():
    answers = ["0.5", None, "1/2", "3", r"\frac{1}{2}", "3.0", None, "x"]
    clusters, reps = cluster_answers(answers, AnswerEquivalence())
    assert clusters == [0, -1, 0, 1, 0, 1, -1, 2]
    assert reps == ["0.5", "3", "x"]


def test_cluster_answers_joins_the_first_matching_cluster():
    # "ab" matches both representatives "a" and "b"; the earlier cluster wins.
    def shares_a_letter(x: str, y: str) -> bool:
        return bool(set(x) & set(y))

    clusters, reps = cluster_answers(["b", "a", "ab", None], shares_a_letter)
    assert clusters == [0, 1, 0, -1]
    assert reps == ["b", "a"]
    assert cluster_answers([None, None], shares_a_letter) == ([-1, -1], [])
