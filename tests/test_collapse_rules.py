"""Collapse rules that saturate a step alone (a drift rule beside the agreement rules)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from covo.callbacks.collapse import CollapseDetector, Rule, parse_rules

# the default rules plus KL far from the reference on its own
RULES = {
    "top_answer_share": {"above": 0.95},
    "token_entropy": {"drop": 0.5},
    "kl": [{"above": 1.0}, {"above": 2.0, "alone": True}],
}


def test_a_signal_may_hold_several_rules_and_one_may_stand_alone():
    assert parse_rules(OmegaConf.create(RULES)) == [
        Rule("top_answer_share", "above", 0.95),
        Rule("token_entropy", "drop", 0.5),
        Rule("kl", "above", 1.0),
        Rule("kl", "above", 2.0, alone=True),
    ]
    with pytest.raises(ValueError, match="rules.kl must be"):
        parse_rules({"kl": {"above": 1.0, "alone": "yes"}})
    with pytest.raises(ValueError, match="min_rules must be in \\[1, 3\\]"):
        CollapseDetector(RULES, min_rules=4)


def test_a_drift_alone_raises_the_alarm_while_the_answers_disagree():
    detector = CollapseDetector(RULES, min_rules=2, window_rollouts=3)
    # a run that drifts: entropy 5.9 -> 3.2 (a 46% drop, under the 50% rule), KL 0 -> 2.5,
    # answers never agree; KL >= 2 at steps 4-7 (alone), >= 1 from step 2 (one counted rule)
    kl = [0.0, 0.5, 1.1, 1.6, 2.1, 2.3, 2.4, 2.5]
    entropy = [5.9, 5.9, 5.9, 5.0, 4.5, 4.0, 3.5, 3.2]
    share = [0.25, 0.5, 0.25, 0.5, 0.5, 0.25, 0.5, 0.5]
    verdicts = [
        detector.update({"kl": k, "token_entropy": e, "top_answer_share": a})
        for k, e, a in zip(kl, entropy, share)
    ]
    assert [v.saturated for v in verdicts] == [False] * 4 + [True] * 4
    assert [t for t, v in enumerate(verdicts) if v.alarm] == [6, 7]
    # the same stream under the rules without the alone one: never saturated
    plain = CollapseDetector({k: v for k, v in RULES.items() if k != "kl"} | {"kl": {"above": 1.0}})
    assert not any(
        plain.update({"kl": k, "token_entropy": e, "top_answer_share": a}).saturated
        for k, e, a in zip(kl, entropy, share)
    )


def test_slope_and_acceleration_rules_read_the_signals_recent_values():
    # distinct answers fall 0.5 a rollout from rollout 3 on; the slope of the last 3 values is
    # (y[-1] - y[-3]) / 2: 0, -0.25, -0.5, -0.5 from rollout 2 on
    detector = CollapseDetector({"distinct_answers": {"slope_below": -0.4, "over": 3}}, 1, 1)
    falls = [detector.update({"distinct_answers": d}) for d in [4, 4, 4, 3.5, 3, 2.5]]
    assert [v.saturated for v in falls] == [False] * 4 + [True] * 2
    # KL's step-to-step change (over: 2) minus the change before it: 0, 0.02, 0.05 from rollout 3
    detector = CollapseDetector({"kl": {"accel_above": 0.03, "over": 2}}, 1, 1)
    kl = [0.0, 0.01, 0.02, 0.03, 0.06, 0.12]
    assert [detector.update({"kl": k}).alarm for k in kl] == [False] * 5 + [True]
    # a rising top-answer share, slope over the default 5 rollouts (0.02 per rollout)
    rule = parse_rules({"top_answer_share": {"slope_above": 0.015}})[0]
    assert rule == Rule("top_answer_share", "slope_above", 0.015, over=5)
    assert not rule.holds([0.5, 0.52, 0.54, 0.56], None)  # 4 values: not yet a trend
    assert rule.holds([0.5, 0.52, 0.54, 0.56, 0.58], None)
    assert not rule.holds([0.5, 0.51, 0.52, 0.53, 0.54], None)  # 0.01 per rollout
    assert rule.describe([0.5, 0.52, 0.54, 0.56, 0.58], None) == (
        "top_answer_share slope 0.02/rollout >= 0.015 (last 5)"
    )


@pytest.mark.parametrize(
    "spec",
    [
        {"above": 0.9, "over": 3},  # a level rule has no window
        {"slope_below": -0.1, "over": 1},  # a slope needs two values
        {"accel_above": 0.01, "over": True},
        {"slope_sideways": 0.1},
    ],
)
def test_a_bad_trend_rule_is_one_error_naming_the_signal(spec):
    with pytest.raises(ValueError, match="rules.kl must be one of .*slope_above"):
        parse_rules({"kl": spec})
