"""Mutation test of the other config groups' YAMLs (algorithm, optimizer, scheduler, data,
trainer, strategy, logger, callbacks, model): perturb each numeric and boolean value in turn,
run tests/test_knobs_reach.py in a scratch copy of the repository, and count the perturbations
it catches.

    python scripts/mutate_group_yaml.py                       # every group
    python scripts/mutate_group_yaml.py --groups optimizer scheduler

The same machinery as scripts/mutate_reward_yaml.py: a number moves to half of it (0 -> 0.1,
an integer n -> n + 1), numbers inside a one-line list or map too (`betas: [0.9, 0.95]`,
`parts: {train: 9, val: 1}`), a boolean flips; the tests run with `-k` the perturbed option's
name. Interpolations (`${...}`), strings, paths and Hydra's own keys (`_partial_`) are left
alone.
Exit status 1 when a perturbation survives.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mutate_reward_yaml import perturbed_lines, run_mutants

GROUPS = [
    "algorithm",
    "optimizer",
    "scheduler",
    "data",
    "trainer",
    "strategy",
    "logger",
    "callbacks",
    "model",
]


def group_mutants(groups: list[str]):
    def find(root: Path) -> list[tuple[Path, int, str, str]]:
        out = []
        for group in groups:
            for path in sorted((root / "conf" / group).glob("*.yaml")):
                for index, line in enumerate(path.read_text().splitlines()):
                    if line.lstrip().startswith("_"):  # Hydra's own keys (_partial_)
                        continue
                    for new in perturbed_lines(line, bools=True, flows=True):
                        out.append((path, index, line, new))
        return out

    return find


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", nargs="+", default=GROUPS, choices=GROUPS)
    parser.add_argument("--tests", nargs="+", default=["tests/test_knobs_reach.py"])
    args = parser.parse_args()
    return run_mutants(group_mutants(args.groups), args.tests)


if __name__ == "__main__":
    sys.exit(main())
