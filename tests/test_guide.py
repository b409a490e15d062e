"""docs/guide.md as a user follows it: its files are written into an empty folder, its `run`
blocks run there (slow: the tiny model, seconds of training each), and every `covo` command of
its `run` and `compose` blocks composes with Hydra (GPUs, SLURM and real models included)."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from covo.infra.configs import conf_dir
from covo.rewards.base import Group

GUIDE = ROOT / "docs" / "guide.md"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", re.M | re.S)
CONFIG_OF = {"train": "train", "eval": "eval", "study": "study", "outcomes": "outcomes"}


def blocks() -> list[tuple[str, str, str]]:
    """(language, what the fence says after it, text) of every fenced block."""
    return [(lang, info.strip(), text) for lang, info, text in FENCE.findall(GUIDE.read_text())]


def files() -> dict[str, str]:
    return {
        info.removeprefix("file="): text for _, info, text in blocks() if info.startswith("file=")
    }


def commands(kind: str) -> list[str]:
    return [line for lang, info, text in blocks() if info == kind for line in text.splitlines()]


def user_folder(tmp_path: Path) -> Path:
    """An empty folder holding the guide's files."""
    folder = tmp_path / "user"
    for name, text in files().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """A multirun's overrides, one list per job (`seed=1,2` -> `seed=1`, `seed=2`)."""
    choices = []
    for override in overrides:
        key, _, value = override.partition("=")
        split = "," in value and not value.startswith("[")
        choices.append([f"{key}={v}" for v in value.split(",")] if split else [override])
    return [list(point) for point in itertools.product(*choices)]


def composed(line: str, folder: Path) -> list:
    """The configs a `covo <command> ...` line composes, one per job (Hydra initialised)."""
    words = shlex.split(line.replace("$PWD", str(folder)))
    words = words[next(i for i, w in enumerate(words) if w == "covo") :]
    command, overrides = words[1], [w for w in words[2:] if w != "-m"]
    configs = []
    for point in sweep_points(overrides):
        cfg = compose(CONFIG_OF[command], overrides=point, return_hydra_config=True)
        with open_dict(cfg):
            cfg.paths.output_dir = str(folder / "out")
            hydra_node = cfg.pop("hydra")
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        configs.append((command, cfg, hydra_node))
    return configs


def test_the_guide_has_what_it_promises():
    assert set(files()) == {"problems.jsonl", "my_rewards.py", "conf/reward/concise_majority.yaml"}
    runs = commands("run")
    assert [line.split("covo ")[1].split()[0] for line in runs] == [
        "train",
        "train",
        "eval",
        "study",
    ]
    assert any(
        "strategy=fsdp" in line and "trainer.devices=8" in line for line in commands("compose")
    )


def test_every_command_composes(tmp_path, monkeypatch):
    folder = user_folder(tmp_path)
    monkeypatch.syspath_prepend(str(folder))
    lines = commands("run") + commands("compose")
    seen = {}
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        for line in lines:
            for command, cfg, hydra_node in composed(line, folder):
                seen.setdefault(command, []).append((cfg, hydra_node))
                if command == "train":
                    hydra.utils.instantiate(cfg.reward)  # the guide's own reward too
    trains = [cfg for cfg, _ in seen["train"]]
    own = [cfg for cfg in trains if cfg.reward._target_ == "my_rewards.ConciseMajority"]
    assert len(own) == 1 and own[0].module.val_extractor == "boxed_or_last_number"
    (jsonl,) = [cfg for cfg in trains if cfg.data.name == "jsonl"]
    assert jsonl.data.train.path == str(folder / "problems.jsonl")
    (base,) = [cfg for cfg in trains if cfg.model.get("chat_template") is False]
    assert base.model.name_or_path == "Qwen/Qwen2.5-Math-1.5B"
    slurm = [(cfg, h) for cfg, h in seen["train"] if "submitit" in str(h.launcher.get("_target_"))]
    assert len(slurm) == 3  # seed=1,2,3
    for cfg, launcher in ((c, h.launcher) for c, h in slurm):
        assert (launcher.max_num_timeout, launcher.nodes, launcher.gpus_per_node) == (3, 1, 8)
        assert cfg.ckpt_path == "last" and cfg.strategy._target_ == "covo.infra.strategies.fsdp"
    assert len([cfg for cfg in trains if cfg.reward._target_.endswith("MajorityReward")]) >= 3


def test_the_guides_reward_by_hand(tmp_path, monkeypatch):
    """ConciseMajority on 4 responses: answers 19, 19, 18, none; lengths 10, 5, 3, 2 tokens.
    The 19s win; the longest is 10: rewards 1 - 0.5 * 10/10 = 0.5, 1 - 0.5 * 5/10 = 0.75, 0, 0."""
    monkeypatch.syspath_prepend(str(user_folder(tmp_path)))
    from my_rewards import ConciseMajority

    texts = ["so \\boxed{19}", "\\boxed{19}", "\\boxed{18}", "no idea"]
    lengths = [10, 5, 3, 2]
    empty = [torch.zeros(n) for n in lengths]
    group = Group(
        prompt_ids=[1, 2],
        response_ids=[list(range(n)) for n in lengths],
        texts=texts,
        token_logprobs=empty,
        token_entropy=empty,
        token_self_certainty=empty,
    )
    out = ConciseMajority(penalty=0.5, extractor="boxed")(group)
    assert out.rewards == [0.5, 0.75, 0.0, 0.0]
    assert out.answers == ["19", "19", "18", None]
    assert out.scores == [0.5, 0.5, 0.25, 0.0]


@pytest.mark.slow
def test_the_guides_run_blocks_run_from_an_empty_folder(tmp_path):
    folder = user_folder(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "covo").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m covo "$@"\n')
    (bin_dir / "covo").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVO_")}
    env |= {
        "PATH": f"{bin_dir}:{env['PATH']}",
        "COVO_CACHE_DIR": str(tmp_path / "cache"),
        "COVO_NATIVE_BF16": "0",
        "OMP_NUM_THREADS": "1",
    }
    for line in commands("run"):
        proc = subprocess.run(
            ["bash", "-c", f"{line} threads=1"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
    runs = sorted((folder / "logs" / "debug" / "runs").glob("*/config.yaml"))
    targets = [OmegaConf.load(path).reward._target_ for path in runs]
    assert targets == ["covo.rewards.covo.reward.CoVoReward", "my_rewards.ConciseMajority"]
    assert len(list((folder / "logs" / "eval" / "runs").iterdir())) == 1
    assert len(list((folder / "logs" / "study" / "runs").glob("*/study.json"))) == 1


def test_a_reward_yaml_of_only_its_constructor_call_trains(tmp_path):
    """No `extractor` key: validation reads answers with boxed_or_last_number; a reward that
    has one keeps it for validation too."""
    (tmp_path / "reward").mkdir()
    (tmp_path / "reward" / "bare.yaml").write_text(
        "_target_: covo.rewards.majority.MajorityReward\n"
    )
    searchpath = f"hydra.searchpath=[file://{tmp_path}]"
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        bare = compose("train", ["reward=bare", searchpath])
        paper = compose("train", ["reward=covo_paper", searchpath])
    assert bare.module.val_extractor == "boxed_or_last_number"
    assert paper.module.val_extractor == "boxed"
