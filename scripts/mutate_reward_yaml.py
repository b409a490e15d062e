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
NUMBER = re.compile(r"^(?P<head>\s*[\w]+:\s*)(?P<value>-?\d+(?:\.\d+)?)(?P<tail>\s*(?:#.*)?)$")
TARGET = re.compile(r"^(?P<head>_target_:\s*)(?P<value>[\w.]+)(?P<tail>\s*(?:#.*)?)$")


def perturb_number(text: str) -> str:
    if "." not in text:
        return str(int(text) + 1)
    value = float(text)
    return "0.1" if value == 0 else repr(value / 2)


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", nargs="+", default=["tests/test_reward_yaml_values.py"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "repo"
        copy.mkdir()
        for part in ("conf", "tests", "docs", "pyproject.toml"):
            source = ROOT / part
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, copy / part)
        killed, survived = 0, []
        for path, index, old, new in mutants(copy):
            lines = path.read_text().splitlines()
            original = path.read_text()
            lines[index] = new
            path.write_text("\n".join(lines) + "\n")
            os.chdir(copy)
            code = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-k", path.stem, *args.tests])
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
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
