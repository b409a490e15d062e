from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from covo.models.loading import build_tiny
from covo.rewards.majority import MajorityReward

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SHARED_DATA = Path(os.environ.get("COVO_BENCHMARK_DIR", ROOT.parent / "shared" / "data"))

torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))


def leaves(node: dict, prefix: str = "") -> dict:
    """A nested dict's values by dotted key (an empty dict is a value)."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def options(group: str) -> list[str]:
    """The options of a config group: the names of conf/<group>/*.yaml."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory) -> Path:
    """The tiny model and tokenizer saved as a Hugging Face folder (model=hf's name_or_path)."""
    path = tmp_path_factory.mktemp("tiny_hf")
    loaded = build_tiny()
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


def compose_config(name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """The real config as @hydra.main would compose it, with outputs under `output_dir`."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


# two prompts with 4 responses each, boxed answers that form clusters (the reward tests' groups)
GROUPS_OF_FOUR = [
    {
        "prompt": "What is 12 + 7?",
        "responses": [
            "First, 12 + 7 = 19.\nSo the total is 19.\nThe answer is: \\boxed{19}",
            "We compute 12 + 7 = 18.\nThus \\boxed{18}",
            "Step 1: add the numbers.\nStep 2: check.\nThe answer is: \\boxed{19}",
            "No idea.",
        ],
        "answer": "19",
    },
    {
        "prompt": "What is 3 * 4?",
        "responses": [
            "3 * 4 = 12.\n\nThe answer is: \\boxed{12}",
            "3 * 4 = 7.\nSo \\boxed{7}",
            "Add 3 four times: 12.\nCheck: 12.\n\\boxed{12}",
            "We compute 3 * 4 - 5 = 7.\nThe answer is: \\boxed{7}",
        ],
        "answer": "12",
    },
]


class PeekingMajority(MajorityReward):
    """A label-free reward with a bug: it looks at the label."""

    def __call__(self, group, scorer=None):
        out = super().__call__(group, scorer)
        out.rewards = [float(a == group.label) for a in out.answers]
        return out


TINY_RUN = [
    "model=tiny",
    "trainer.max_steps=2",
    "data.batch_size=2",
    "data.train.num_problems=16",
    "data.val.num_problems=4",
    "rollout.num_samples=3",
    "rollout.max_new_tokens=24",
    "logger=tensorboard",
]


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*overrides: str, name: str = "train") -> DictConfig:
        return compose_config(name, [*TINY_RUN, *overrides], tmp_path)

    return make


class ConstantOnRollouts:
    """The wrapped reward, with every reward of the rollouts (`Group.step`) in `rollouts` set
    to `value`: each of their groups is all-equal (all-zero ones are filtered by
    `algorithm.filter.drop_all_zero`)."""

    def __init__(self, inner, rollouts: set[int], value: float):
        self.inner, self.rollouts, self.value = inner, rollouts, value

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, group, scorer):
        result = self.inner(group, scorer)
        if group.step in self.rollouts:
            result.rewards = [self.value] * len(result.rewards)
        return result


def grpo_config(output_dir: Path, **changes):
    """TRL's GRPOConfig of the TRL tests (the `trl` extra): CPU, fp32, 2 groups of 4 a step, 16
    new tokens, 2 steps, no KL, a log every step, no checkpoints; `changes` override."""
    from trl import GRPOConfig

    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=16,
        max_steps=2,
        beta=0.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return GRPOConfig(**{**settings, **changes})
