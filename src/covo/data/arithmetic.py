"""Arithmetic word-free problems generated from a seed: the offline default training set."""

from __future__ import annotations

import random

OPERATORS = ("+", "-", "*")


def make_problem(rng: random.Random, num_operands: int, max_value: int, operators) -> dict:
    values = [rng.randint(1, max_value) for _ in range(num_operands)]
    ops = [rng.choice(operators) for _ in range(num_operands - 1)]
    expression = str(values[0])
    for op, value in zip(ops, values[1:]):
        expression += f" {op} {value}"
    answer = eval(expression, {"__builtins__": {}})  # only digits and + - * from above
    return {"problem": f"Compute {expression}.", "answer": str(answer)}


def generate(
    num_problems: int,
    seed: int = 0,
    split: str = "train",
    min_operands: int = 2,
    max_operands: int = 3,
    max_value: int = 20,
    operators: list[str] | tuple[str, ...] = OPERATORS,
) -> list[dict]:
    """`num_problems` items `{"problem", "answer"}`; the same seed and split give the same list."""
    unknown = set(operators) - set(OPERATORS)
    if unknown:
        raise ValueError(f"unknown arithmetic operators {sorted(unknown)}: use {OPERATORS}")
    if not 2 <= min_operands <= max_operands:
        raise ValueError(
            f"need 2 <= min_operands <= max_operands, got {min_operands}, {max_operands}"
        )
    rng = random.Random(f"{seed}/{split}")
    return [
        make_problem(rng, rng.randint(min_operands, max_operands), max_value, list(operators))
        for _ in range(num_problems)
    ]
