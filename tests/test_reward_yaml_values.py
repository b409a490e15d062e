"""Every reward option composes to the values docs/rewards.md documents for it ("Every option's
values"), and every one of them reaches the object the run builds.

The table is the oracle: a YAML whose number, choice or `_target_` drifts from it fails here,
and so does a constructor that drops a knob or stores another value. Knobs an object keeps
under another name or as a function are mapped to it explicitly (`KNOBS`)."""

from __future__ import annotations

import re

import hydra
import pytest
import yaml
from conftest import CONF_DIR, ROOT, compose_config, leaves
from omegaconf import OmegaConf

from covo.answers import (
    extract_boxed,
    extract_boxed_or_last_number,
    extract_last_number,
    extract_released_boxed,
)
from covo.rewards.covo import reward as covo_reward
from covo.rewards.covo.select import pass_threshold, pass_top1
from covo.rewards.covo.stats import (
    aggregate_consistency,
    aggregate_linear,
    aggregate_vector,
    aggregate_volatility,
    curiosity_paper,
    curiosity_released,
)

REWARDS = sorted(path.stem for path in (CONF_DIR / "reward").glob("*.yaml"))
RUN_SEED = "<run seed>"
TEMPLATE = "The answer is: \\boxed{"
REFRAMED = (
    "{prompt}\nFirst restate the problem in your own words (with concrete values, in a more "
    "general form, or in another setting), then solve your restatement step by step and put "
    "the final answer within \\boxed{}."
)


def documented() -> dict[str, tuple[str, dict]]:
    """docs/rewards.md's table: option -> (class, every knob's value), rows based on another
    option merged over it."""
    text = (ROOT / "docs" / "rewards.md").read_text()
    section = text.split("## Every option's values", 1)[1]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].startswith("`"):
            continue
        option, base, cls, values = (c.strip("`") for c in cells[:4])
        pairs = re.findall(r"`([\w.]+)=([^`]*)`", cells[3])
        parsed = {k: v if v == RUN_SEED else yaml.safe_load(v) for k, v in pairs}
        rows[option] = (base, cls, parsed)

    def resolve(option):
        base, cls, values = rows[option]
        if not base:
            return cls, values
        base_cls, base_values = resolve(base)
        return cls or base_cls, {**base_values, **values}

    return {option: resolve(option) for option in rows}


DOCUMENTED = documented()


def test_the_table_names_every_option_and_only_those():
    assert sorted(DOCUMENTED) == REWARDS
    # the table's own numbers, as the paper and the released code give them
    assert DOCUMENTED["restrain"][1]["min_majority_share"] == 0.3
    assert DOCUMENTED["covo_linear"][1]["threshold"] == 0.05
    assert DOCUMENTED["covo"][1]["max_steps"] == 15


@pytest.mark.parametrize("name", REWARDS)
def test_the_yaml_composes_to_the_documented_values(name, tmp_path):
    cls, values = DOCUMENTED[name]
    node = compose_config("train", [f"reward={name}", "seed=7"], tmp_path).reward
    composed = leaves(OmegaConf.to_container(node, resolve=False))
    expected = {"_target_": cls, **values}
    if name == "random":
        expected["seed"] = "${oc.select:seed,0}"
        assert node.seed == 7  # resolves to the run's seed
    if cls == "covo.rewards.covo.reward.CoVoReward":
        expected["template"] = TEMPLATE
    if name == "self_harmony":
        expected["views.reframed"] = REFRAMED
    assert composed == expected


EXTRACTORS = {
    extract_released_boxed: "released_boxed",
    extract_boxed: "boxed",
    extract_last_number: "last_number",
    extract_boxed_or_last_number: "boxed_or_last_number",
}
AGGREGATIONS = {
    aggregate_linear: "linear",
    aggregate_vector: "vector",
    aggregate_consistency: "consistency",
    aggregate_volatility: "volatility",
}
# knobs kept under another name or as the function they pick: knob -> its value on the object
KNOBS = {
    "extractor": lambda r: EXTRACTORS[r.extract],
    "timeout_s": lambda r: r.equivalence.timeout_s,
    "aggregation": lambda r: AGGREGATIONS[r.aggregate],
    "mode": lambda r: {covo_reward._binary: "binary", covo_reward._continuous: "continuous"}[
        r.to_reward
    ],
    "curiosity.form": lambda r: {curiosity_released: "released", curiosity_paper: "paper"}[
        r.curiosity.value
    ],
    "curiosity.weight": lambda r: r.curiosity_weight,
    "select": lambda r: (
        {pass_threshold: "threshold", pass_top1: "top1"}[r.pass_clusters]
        if r.select in ("threshold", "top1")
        else r.select
    ),
    "views.reframed": lambda r: r.views["reframed"],
}


def knob_values(reward, keys) -> dict:
    """The value each knob of `keys` has on the built reward (same-named attribute unless
    `KNOBS` maps it)."""
    return {key: KNOBS[key](reward) if key in KNOBS else getattr(reward, key) for key in keys}


@pytest.mark.parametrize("name", REWARDS)
def test_every_knob_reaches_the_object(name, tmp_path):
    node = compose_config("train", [f"reward={name}", "seed=7"], tmp_path).reward
    reward = hydra.utils.instantiate(node)
    cls, values = DOCUMENTED[name]
    assert f"{type(reward).__module__}.{type(reward).__name__}" == cls
    expected = {k: (7 if v == RUN_SEED else v) for k, v in values.items()}
    assert knob_values(reward, expected) == expected
    if cls == "covo.rewards.covo.reward.CoVoReward":
        assert reward.template == TEMPLATE
    if name == "self_harmony":
        assert reward.views == {"reframed": REFRAMED}


def test_a_changed_knob_reaches_the_object(tmp_path):
    # the other way round: values that are not the defaults arrive too
    changes = {
        "restrain": ["reward.min_majority_share=0.0", "reward.sigma=2.0", "reward.center=0.5"],
        "entropy": ["reward.last_fraction=0.5", "reward.timeout_s=3.0"],
        "random": ["reward.p=0.7", "reward.extractor=last_number"],
        "covo": [
            "reward.curiosity.form=paper",
            "reward.curiosity.weight=0.3",
            "reward.mode=continuous",
        ],
        "seq_logprob": ["reward.reduction=sum"],
    }
    for name, overrides in changes.items():
        node = compose_config("train", [f"reward={name}", *overrides], tmp_path).reward
        reward = hydra.utils.instantiate(node)
        expected = {
            o.split("=")[0].removeprefix("reward."): yaml.safe_load(o.split("=")[1])
            for o in overrides
        }
        assert knob_values(reward, expected) == expected, name
