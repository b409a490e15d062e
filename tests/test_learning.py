"""RL through the real entry point makes the toy reasoner better on held-out problems, and the
negated reward makes it worse.

Each run is `covo.launch.train.train` composed from `experiment=toy_reasoner_learns` (short), and
the exported policy is scored on data=toy_arithmetic's 64 held-out problems: the mean accuracy of
8 samples each at temperature 1 (`covo.models.toy_reasoner.heldout`), against the packaged
weights scored the same way. The margins sit well outside the spread over seeds measured in
docs/toy_reasoner.md ("Learning tests").
"""

from __future__ import annotations

import hydra
import pytest
import torch
from conftest import compose_config

from covo.launch.train import train
from covo.models import toy_reasoner

STEPS = 40
RISE = 0.05  # ground truth: at least this much above the base accuracy
FALL = 0.10  # negated: at least this much below it
SHORT_RUN = [
    "experiment=toy_reasoner_learns",
    f"trainer.max_steps={STEPS}",
    "+trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "callbacks=none",
]


@pytest.fixture(scope="module")
def val_items(tmp_path_factory):
    cfg = compose_config("train", SHORT_RUN, tmp_path_factory.mktemp("val"))
    return hydra.utils.instantiate(cfg.data).val_items


@pytest.fixture(scope="module")
def base_accuracy(val_items):
    torch.set_num_threads(1)
    return toy_reasoner.heldout(toy_reasoner.load(), val_items)["sampled"]


def accuracy_after_rl(reward: str, val_items, tmp_path) -> float:
    out = train(compose_config("train", [*SHORT_RUN, f"reward={reward}"], tmp_path))
    policy = toy_reasoner.load(out["export_dir"])
    return toy_reasoner.heldout(policy, val_items)["sampled"]


def test_ground_truth_reward_raises_heldout_accuracy(val_items, base_accuracy, tmp_path):
    after = accuracy_after_rl("ground_truth", val_items, tmp_path)
    assert after >= base_accuracy + RISE, (base_accuracy, after)


def test_negated_reward_lowers_heldout_accuracy(val_items, base_accuracy, tmp_path):
    after = accuracy_after_rl("negated_ground_truth", val_items, tmp_path)
    assert after <= base_accuracy - FALL, (base_accuracy, after)


# The label-free test: majority vote (TTRL) on the calibrated lab, whose wrong answers scatter
# as a real model's do, raises held-out accuracy, at the setting where the lab reproduces the
# known results (a third of the lr where ground truth gains most, the policy anchored to the
# reference so that a reward without signal does nothing; docs/outcomes.md). Margin from the
# seed spread in docs/toy_reasoner.md ("Label-free learning test").
LAB_STEPS = 60
MAJORITY_RISE = 0.05
LAB_RUN = [
    "experiment=toy_calibrated_learns",
    "optimizer.lr=3.3e-5",
    "algorithm.kl_coef=0.05",
    f"trainer.max_steps={LAB_STEPS}",
    "+trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "callbacks=none",
]


def test_majority_vote_raises_the_calibrated_labs_heldout_accuracy(tmp_path):
    torch.set_num_threads(1)
    cfg = compose_config("train", [*LAB_RUN, "reward=majority"], tmp_path)
    items = hydra.utils.instantiate(cfg.data).val_items
    base = toy_reasoner.heldout(hydra.utils.instantiate(cfg.model), items)["sampled"]
    out = train(cfg)
    after = toy_reasoner.heldout(toy_reasoner.load(out["export_dir"]), items)["sampled"]
    assert after >= base + MAJORITY_RISE, (base, after)
