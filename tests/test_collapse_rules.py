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
