"""Every knob of the optimizer and scheduler options reaches what the run builds: each key of
`conf/<group>/<option>.yaml` read back from the built object (the optimizer's parameter group,
the scheduler's learning-rate curve). The reward options: tests/test_reward_yaml_values.py."""

from __future__ import annotations

import math

import hydra
import pytest
import torch
from conftest import CONF_DIR, compose_config
from omegaconf import OmegaConf


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def knobs(node) -> dict:
    return {k: v for k, v in OmegaConf.to_container(node).items() if not k.startswith("_")}


@pytest.mark.parametrize("option", options("optimizer"))
def test_optimizer_knobs_reach_the_parameter_group(option, tmp_path):
    node = compose_config("train", [f"optimizer={option}"], tmp_path).optimizer
    optimizer = hydra.utils.instantiate(node)(params=[torch.nn.Parameter(torch.zeros(2))])
    group = optimizer.param_groups[0]
    values = knobs(node)
    assert values  # lr at least
    got = {k: list(group[k]) if isinstance(group[k], tuple) else group[k] for k in values}
    assert got == values


def learning_rates(node, total: int) -> list[float]:
    """The scheduler's factor at each of `total` optimizer steps (peak learning rate 1)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    scheduler = hydra.utils.instantiate(node)(optimizer=optimizer, total_steps=total)
    out = []
    for _ in range(total + 1):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("option", options("scheduler"))
def test_scheduler_knobs_shape_the_learning_rate(option, tmp_path):
    node = compose_config("train", [f"scheduler={option}"], tmp_path).scheduler
    values = knobs(node)
    lrs = learning_rates(node, total=100)
    # the warm-up: ceil(warmup_ratio * total) steps below the peak, then the peak
    warmup = math.ceil(values.pop("warmup_ratio") * 100)
    assert all(lr < 1.0 for lr in lrs[:warmup])
    assert lrs[warmup] == pytest.approx(1.0)
    if "min_lr_ratio" in values:  # cosine: down to min_lr_ratio * peak at the last step
        assert lrs[100] == pytest.approx(values.pop("min_lr_ratio"), abs=1e-9)
    else:
        assert lrs[warmup:] == pytest.approx([1.0] * (101 - warmup))
    assert not values, f"knobs this test does not read: {sorted(values)}"
