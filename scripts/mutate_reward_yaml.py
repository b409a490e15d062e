"""Mutation test of conf/reward/*.yaml: perturb each numeric value and each `_target_` in turn,
run the tests in a scratch copy of the repository, and count the perturbations they catch.

    python scripts/mutate_reward_yaml.py                      # tests/test_reward_yaml_values.py
    python scripts/mutate_reward_yaml.py --tests tests/test_rewards_simple.py tests/test_configs.py

A perturbation is killed when pytest fails. The tests run in this process (`pytest.main`, once
per perturbation, `-k` the perturbed option's name), so the imports are paid once. Numbers move
to a value the constructor still accepts (half of it; 0 -> 0.1; an integer n -> n + 1), so a
kill means the tests noticed the value, not that the run failed to build. A `_target_` moves
to the next reward class.
Exit status 1 when a perturbation survives.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REWARD_DIR = Path("conf") / "reward"
VALUE = r"-?\d+(?:\.\d+)?(?:e-?\d+)?"
NUMBER = re.compile(rf"^(?P<head>\s*[\w]+:\s*)(?P<value>{VALUE})(?P<tail>\s*(?:#.*)?)$")
BOOL = re.compile(r"^(?P<head>\s*[\w]+:\s*)(?P<value>true|false)(?P<tail>\s*(?:#.*)?)$")
# a number inside a flow list or map on one line: `betas: [0.9, 0.95]`, `{max_terms: 3}`
FLOW_NUMBER = re.compile(rf"(?<=[\[{{,:] ){VALUE}(?=[,\]}}])")
TARGET = re.compile(r"^(?P<head>_target_:\s*)(?P<value>[\w.]+)(?P<tail>\s*(?:#.*)?)$")


def perturb_number(text: str) -> str:
    if "." not in text and "e" not in text:
        return str(int(text) + 1)
    value = float(text)
    return "0.1" if value == 0 else repr(value / 2)


def perturbed_lines(line: str, bools: bool = False, flows: bool = False) -> list[str]:
    """The line with one value perturbed, for each value it holds: a `key: number`; with
    `bools`, a `key: true|false` flipped; with `flows`, each number of a one-line flow list or
    map."""
    if match := NUMBER.match(line):
        return [f"{match['head']}{perturb_number(match['value'])}{match['tail']}"]
    if bools and (match := BOOL.match(line)):
        flipped = "false" if match["value"] == "true" else "true"
        return [f"{match['head']}{flipped}{match['tail']}"]
    code = line.split("#", 1)[0]
    if not flows or not ("[" in code or "{" in code):
        return []
    return [
        f"{line[: m.start()]}{perturb_number(m.group())}{line[m.end() :]}"
        for m in FLOW_NUMBER.finditer(code)
    ]


def mutants(root: Path) -> list[tuple[Path, int, str, str]]:
    """(file, line index, old line, new line) for every perturbation."""
    files = sorted((root / REWARD_DIR).glob("*.yaml"))
    targets = []
    for path in files:
        for line in path.read_text().splitlines():
            match = TARGET.match(line)
            if match and match["value"] not in targets:
                targets.append(match["value"])
    out = []
    for path in files:
        for index, line in enumerate(path.read_text().splitlines()):
            if match := TARGET.match(line):
                other = targets[(targets.index(match["value"]) + 1) % len(targets)]
                new = f"{match['head']}{other}{match['tail']}"
            elif match := NUMBER.match(line):
                new = f"{match['head']}{perturb_number(match['value'])}{match['tail']}"
            else:
                continue
            out.append((path, index, line, new))
    return out


def run_mutants(find_mutants, tests: list[str]) -> int:
    """Apply each of `find_mutants(copy)`'s perturbations in turn to a scratch copy of the
    repository and run `tests` there (`-k` the perturbed file's name); prints each verdict and
    the count. Exit status 1 when a perturbation survives."""
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "repo"
        copy.mkdir()
        for part in ("conf", "tests", "docs", "pyproject.toml"):
            source = ROOT / part
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, copy / part)
        killed, survived = 0, []
        for path, index, old, new in find_mutants(copy):
            original = path.read_text()
            lines = original.splitlines()
            lines[index] = new
            path.write_text("\n".join(lines) + "\n")
            os.chdir(copy)
            code = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-k", path.stem, *tests])
            os.chdir(ROOT)
            path.write_text(original)
            if code == pytest.ExitCode.NO_TESTS_COLLECTED:
                raise SystemExit(f"no test matches -k {path.stem}")
            name = f"{path.relative_to(copy)}:{index + 1}: {old.strip()} -> {new.strip()}"
            if code == pytest.ExitCode.OK:
                survived.append(name)
                print(f"SURVIVED {name}", flush=True)
            else:
                killed += 1
                print(f"killed   {name}", flush=True)
    print(f"{killed} killed, {len(survived)} survived of {killed + len(survived)}")
    for name in survived:
        print(f"survived: {name}")
    return 1 if survived else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", nargs="+", default=["tests/test_reward_yaml_values.py"])
    args = parser.parse_args()
    return run_mutants(mutants, args.tests)


if __name__ == "__main__":
    sys.exit(main())
