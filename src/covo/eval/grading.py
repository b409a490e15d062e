"""Graders: read a response's final answer and compare it with the label.

`MathGrader` compares extracted answers with math-verify; `ChoiceGrader` reads the last
`Answer: X` line of a multiple-choice response and compares letters.
"""

from __future__ import annotations

import re

from covo.answers import AnswerEquivalence, extract_boxed, get_extractor
from covo.infra.errors import DataError

# A line `Answer: X` (also `Final answer:`, markdown bold, `(X)`, `X)`, `\boxed{X}`), X in A-J.
# The letter must be upper case and stand alone, so "Answer: a dog" or "Answer: Because" do not
# count; the decoration between colon and letter stays on the same line.
_CHOICE_LINE = re.compile(
    r"^[ \t*_#>]*(?i:(?:final[ \t]+)?answer)[ \t*_]*:[ \t*_$(\[]*(?:\\boxed\{|\\text\{)?"
    r"([A-J])(?![A-Za-z0-9])",
    re.MULTILINE,
)
_LABEL_LETTER = re.compile(r"\(?([A-J])\)?")


def extract_choice(text: str) -> str | None:
    """Letter of the last `Answer: X` line, or None.

    Only that line format counts: "The answer is B" gives None, since a letter named in free
    text is as likely an option being discussed as the one chosen.
    """
    found = _CHOICE_LINE.findall(text)
    return found[-1] if found else None


def choice_label(label: str) -> str:
    """`B`, `(B)` or `\\boxed{B}` -> `B`; anything else raises ValueError."""
    boxed = extract_boxed(label)
    text = (boxed if boxed is not None else label).strip()
    match = _LABEL_LETTER.fullmatch(text)
    if match is None:
        raise DataError(f"multiple-choice label is not a letter A-J: {label!r}")
    return match.group(1)


class MathGrader:
    """Answer extracted by a named extractor, compared with the label by math-verify."""

    def __init__(self, extractor: str = "boxed_or_last_number", timeout_s: float = 2.0):
        self.extract = get_extractor(extractor)
        self.equivalence = AnswerEquivalence(timeout_s)

    def parse_label(self, label: str) -> str:
        """The gold answer: the label's `\\boxed{...}` content, else the label itself."""
        boxed = extract_boxed(label)
        return (boxed if boxed is not None else label).strip()

    def is_correct(self, answer: str | None, gold: str) -> bool:
        return self.equivalence.is_correct(answer, gold)

    def same(self, a: str, b: str) -> bool:
        return self.equivalence(a, b)


class ChoiceGrader:
    """Letter of the last `Answer: X` line, compared with the gold letter."""

    def extract(self, text: str) -> str | None:
        return extract_choice(text)

    def parse_label(self, label: str) -> str:
        return choice_label(label)

    def is_correct(self, answer: str | None, gold: str) -> bool:
        return answer is not None and answer == gold

    def same(self, a: str, b: str) -> bool:
        return a == b
