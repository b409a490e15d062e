"""A benchmark: a JSON-lines file, the prompt around each problem, and how answers are graded."""

from __future__ import annotations

from dataclasses import dataclass

from covo.data.jsonl import DataError, read_jsonl
from covo.eval.grading import ChoiceGrader, MathGrader


@dataclass
class Benchmark:
    """`path` may be `package:gsm8k` / `package:math500` or a file; `prompt` holds `{problem}`."""

    path: str
    prompt: str
    grader: MathGrader | ChoiceGrader
    problem_key: str = "problem"
    answer_key: str = "answer"

    def __post_init__(self):
        if "{problem}" not in self.prompt:
            raise ValueError(f"benchmark prompt must contain '{{problem}}': {self.prompt!r}")

    def load(self, max_samples: int | None = None) -> list[dict]:
        """The first `max_samples` items as `{"problem", "prompt", "label"}`, label parsed to
        the gold answer the grader compares with."""
        items = read_jsonl(self.path, self.problem_key, self.answer_key, max_samples)
        out = []
        for i, item in enumerate(items, start=1):
            if item["answer"] is None:
                raise DataError(f"{self.path}: item {i} has no '{self.answer_key}'")
            out.append(
                {
                    "problem": item["problem"],
                    "prompt": self.prompt.format(problem=item["problem"]),
                    "label": self.grader.parse_label(item["answer"]),
                }
            )
        return out
