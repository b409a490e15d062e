"""Arithmetic word-free problems generated from a seed: the offline default training set.

`parts` splits the space of problems deterministically by a hash of each problem's text
(`covo.data.contamination.fingerprint`): with `parts={pretrain: 8, train: 1, val: 1}` a
problem belongs to exactly one part, whatever the seed, so a pretraining corpus, an RL
training set and a held-out set drawn from their own parts share no problem. Within the
held-out part, `skip` separates two splits: a validation list is the first problems of the
part's stream, a test list the problems after the first `skip` (distinct draws of one stream).
"""

from __future__ import annotations

import random

from covo.data.contamination import fingerprint

OPERATORS = ("+", "-", "*")
TEMPLATE_LINE = "The answer is: \\boxed{{{answer}}}"


def make_problem(rng: random.Random, num_operands: int, max_value: int, operators) -> dict:
    values = [rng.randint(1, max_value) for _ in range(num_operands)]
    ops = [rng.choice(operators) for _ in range(num_operands - 1)]
    expression = str(values[0])
    for op, value in zip(ops, values[1:]):
        expression += f" {op} {value}"
    answer = eval(expression, {"__builtins__": {}})  # only digits and + - * from above
    return {"problem": f"Compute {expression}.", "answer": str(answer)}


def part_of(problem: str, parts: dict[str, int]) -> str:
    """The part a problem's text falls in: its fingerprint modulo the parts' total weight."""
    point = int(fingerprint(problem)[:16], 16) % sum(parts.values())
    for name, weight in parts.items():
        if point < weight:
            return name
        point -= weight
    raise AssertionError("unreachable: point < total weight")


def generate(
    num_problems: int,
    seed: int = 0,
    split: str = "train",
    min_operands: int = 2,
    max_operands: int = 3,
    max_value: int = 20,
    operators: list[str] | tuple[str, ...] = OPERATORS,
    parts: dict[str, int] | None = None,
    distinct: bool = False,
    skip: int = 0,
) -> list[dict]:
    """`num_problems` items `{"problem", "answer"}`; the same seed and split give the same list.

    With `parts` (part name -> integer weight), only problems of the part named `split` are
    kept (`part_of`); `distinct` drops repeats. The first `skip` problems are drawn and left
    out: with `distinct`, another list of the same seed, split and settings and at most `skip`
    problems shares none with this one.
    """
    unknown = set(operators) - set(OPERATORS)
    if unknown:
        raise ValueError(f"unknown arithmetic operators {sorted(unknown)}: use {OPERATORS}")
    if not 2 <= min_operands <= max_operands:
        raise ValueError(
            f"need 2 <= min_operands <= max_operands, got {min_operands}, {max_operands}"
        )
    if parts is not None and split not in parts:
        raise ValueError(f"split '{split}' is not among the parts {sorted(parts)}")
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    # plain containers, read once per draw (a config node passed in is ~100x slower to read)
    operators, parts = list(operators), None if parts is None else dict(parts)
    total = num_problems + skip
    rng = random.Random(f"{seed}/{split}")
    items, seen = [], set()
    # a bound on draws, so that asking for more distinct problems than a part holds fails
    for _ in range(1000 * total + 1000):
        if len(items) == total:
            return items[skip:]
        item = make_problem(rng, rng.randint(min_operands, max_operands), max_value, operators)
        if parts is not None and part_of(item["problem"], parts) != split:
            continue
        if distinct:
            if item["problem"] in seen:
                continue
            seen.add(item["problem"])
        items.append(item)
    raise ValueError(f"split '{split}' holds fewer than {total} distinct problems")


def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def worked_solution(
    expression: str,
    rng: random.Random | None = None,
    slip_rate: float = 0.0,
    slip_scatter: int = 3,
) -> tuple[str, int]:
    """One line per operation ("3 + 4 = 7"), products first, then left to right, ending with
    `The answer is: \\boxed{...}`; returns (solution, its final value).

    With `rng` and `slip_rate`, each step's result is off by 1 to `slip_scatter` either way
    (uniformly) with that probability and later steps carry the slip on, so the final value is
    then wrong.
    """
    terms = expression.split()
    values, ops = [int(t) for t in terms[0::2]], terms[1::2]
    lines = []

    def step(i: int) -> None:
        result = apply(values[i], ops[i], values[i + 1])
        if rng is not None and rng.random() < slip_rate:
            result += rng.choice([*range(-slip_scatter, 0), *range(1, slip_scatter + 1)])
        lines.append(f"{values[i]} {ops[i]} {values[i + 1]} = {result}")
        values[i : i + 2] = [result]
        del ops[i]

    while "*" in ops:
        step(ops.index("*"))
    while ops:
        step(0)
    lines.append(TEMPLATE_LINE.format(answer=values[0]))
    return "\n".join(lines), values[0]
