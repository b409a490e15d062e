"""Self-Harmony's pseudo-label, and the prompt views a reward declares (covo.rollout.views)."""

from __future__ import annotations

import pytest
import torch

from covo.launch.train import build
from covo.models.loading import build_tiny
from covo.rewards.base import Group, GroupReward
from covo.rewards.harmony import SelfHarmonyReward, harmonic_pseudo_label
from covo.rewards.majority import MajorityReward
from covo.rollout.sampling import build_rollout, format_prompts, response_token_stats
from covo.rollout.views import (
    check_views,
    concat_rollouts,
    training_rows,
    trains_views,
    view_prompts,
)

torch.set_num_threads(1)


def group(texts, **views) -> Group:
    n = len(texts)
    return Group(
        prompt_ids=[1],
        response_ids=[[5]] * n,
        texts=list(texts),
        token_logprobs=[torch.zeros(1)] * n,
        token_entropy=[torch.zeros(1)] * n,
        token_self_certainty=[torch.zeros(1)] * n,
        views=views,
    )


def boxed(*answers):
    return [r"\boxed{" + a + "}" if a is not None else "no idea" for a in answers]


def test_harmonic_mean_picks_the_answer_stable_under_reframing():
    # original: 7 x3, 4 x1; reframed: 4 x2, 9 x2. 7 never appears reframed (score 0);
    # 4: 2 / (1 / 0.25 + 1 / 0.5) = 1/3; 9 is missing from the original
    label, harmony = harmonic_pseudo_label([[0, 0, 0, 1], [1, 1, 2, 2]], 3)
    assert label == 1
    assert harmony == pytest.approx([0.0, 1 / 3, 0.0])


def test_harmonic_mean_ties_and_empty_views():
    # equal scores 0.4 = 2 / (1/0.4 + 1/0.4) = 2 / (1/0.6 + 1/0.3): the larger summed share
    # (0.9 against 0.8) wins, though its cluster comes second
    view0, view1 = [0] * 4 + [1] * 6, [0] * 4 + [1] * 3 + [2] * 3
    label, harmony = harmonic_pseudo_label([view0, view1], 3)
    assert (label, harmony[0], harmony[1]) == (1, pytest.approx(0.4), pytest.approx(0.4))
    # equal scores and shares: the cluster seen first
    assert harmonic_pseudo_label([[0, 0, 1, 1], [1, 1, 0, 0]], 2)[0] == 0
    # nothing in common, or no answers at all: no label
    assert harmonic_pseudo_label([[0, 0], [1, 1]], 2)[0] == -1
    assert harmonic_pseudo_label([[-1, -1], [-1, -1]], 0) == (-1, [])


def test_self_harmony_rewards_the_original_view_against_the_pseudo_label():
    reframed = group(boxed(r"\frac{8}{2}", "4", "9", "9"))
    out = SelfHarmonyReward()(group(boxed("7", "7", "7", "4.0"), reframed=reframed))
    # 4.0, 8/2 and 4 are one answer; majority vote would pick 7
    assert out.rewards == [0.0, 0.0, 0.0, 1.0]
    assert MajorityReward()(group(boxed("7", "7", "7", "4.0"))).rewards == [1.0, 1.0, 1.0, 0.0]
    assert out.clusters == [0, 0, 0, 1]
    assert out.verdicts == [False, True]
    assert out.scores == pytest.approx([0.0, 0.0, 0.0, 1 / 3])
    assert out.view_rewards == {"reframed": [1.0, 1.0, 0.0, 0.0]}
    assert out.group_metrics == {"pseudo_label_found": 1.0, "view_answered_frac": 1.0}


@pytest.mark.parametrize(
    "original, reframed, rewards",
    [
        (("3",), ("3",), [1.0]),  # N = 1, agreeing
        (("3",), ("5",), [0.0]),  # N = 1, no common answer
        ((None, None), (None, None), [0.0, 0.0]),  # no answers
        (("2", "2", "2"), ("2", "2", "2"), [1.0, 1.0, 1.0]),  # all equal
    ],
)
def test_self_harmony_edge_cases(original, reframed, rewards):
    out = SelfHarmonyReward()(group(boxed(*original), reframed=group(boxed(*reframed))))
    assert out.rewards == rewards


def test_view_declarations_are_checked():
    with pytest.raises(ValueError, match=r"reward.views.other must be a string holding \{prompt\}"):
        SelfHarmonyReward(views={"other": "no placeholder"})
    with pytest.raises(ValueError) as err:
        SelfHarmonyReward(views={})
    assert str(err.value) == "reward.views must name at least one view for self_harmony"
    with pytest.raises(ValueError, match="needs the view 'reframed'"):
        SelfHarmonyReward()(group(boxed("1")))
    assert check_views(None) == {}
    # the prompt goes in verbatim; LaTeX braces in the template stay
    assert view_prompts(["Q: 1+1?"], "{prompt}\nRestate, then answer in \\boxed{}.") == [
        "Q: 1+1?\nRestate, then answer in \\boxed{}."
    ]


def sampled(loaded, prompts, max_new_tokens, seed):
    torch.manual_seed(seed)
    return build_rollout(
        loaded.model,
        loaded.tokenizer,
        format_prompts(loaded.tokenizer, prompts, chat_template=True),
        num_samples=2,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_p=1.0,
    )


def test_concatenated_rollouts_keep_every_rows_log_probs():
    loaded = build_tiny(seed=1)
    short = sampled(loaded, ["1+1?", "What is 12 * 7 - 3?"], 6, seed=0)
    long = sampled(loaded, ["A much longer question about 3 + 4, answered in a box?"], 12, seed=1)
    merged = concat_rollouts([short, long], loaded.tokenizer.pad_token_id)
    assert merged.sequences.shape[0] == 6
    assert merged.prompt_len == long.prompt_len > short.prompt_len
    assert merged.response_ids == short.response_ids + long.response_ids
    with torch.no_grad():
        again = response_token_stats(
            loaded.model, merged.sequences, merged.attention_mask, merged.response_mask.shape[1]
        )
    mask = merged.response_mask.bool()
    # the log-probs recomputed on the padded batch are those each rollout measured alone
    assert (again["logprobs"][mask] - merged.logprobs[mask]).abs().max() < 1e-5
    assert merged.logprobs[:4, short.response_mask.shape[1] :].abs().sum() == 0


def test_the_update_trains_on_the_original_view_unless_configured(tiny_cfg):
    prompts = ["What is 2 + 3?", "What is 4 * 5?"]
    for train_views, rows in ((False, 6), (True, 12)):
        cfg = tiny_cfg("reward=self_harmony", f"reward.train_views={train_views}")
        module, _, _ = build(cfg)
        rollout = module.rollout(prompts)
        view = rollout.views["reframed"]
        assert view.texts and len(view.response_ids) == 6
        prompt = module.tokenizer.decode(view.prompt_ids[0])
        assert "What is 2 + 3?" in prompt and "restate the problem in your own words" in prompt
        results = [module.reward(g, None) for g in rollout.groups([None, None])]
        rewards = torch.tensor([r for res in results for r in res.rewards])
        trained, trained_rewards = training_rows(rollout, rewards, results, module.reward, 0)
        assert trained.sequences.shape[0] == len(trained_rewards) == rows
        if train_views:
            expected = [r for res in results for r in res.view_rewards["reframed"]]
            assert trained_rewards[6:].tolist() == expected
        else:
            assert trained is rollout


def test_rewards_without_views_train_as_before():
    rewards = torch.tensor([1.0, 0.0])
    result = GroupReward(rewards=[1.0, 0.0], answers=["1", None], clusters=[0, -1], scores=[1, 0])
    rollout = object()
    assert training_rows(rollout, rewards, [result], MajorityReward(), 0) == (rollout, rewards)


def test_views_are_trained_on_only_when_asked():
    # built in Python without the knob, the reframed responses only vote for the label
    assert not trains_views(SelfHarmonyReward())
    assert trains_views(SelfHarmonyReward(train_views=True))


def test_the_answer_equivalence_given_is_the_one_used():
    # the reframed view answers 2; the original 12, 12, 7, 7. With the default equivalence no
    # answer is in both views (all 0); with "equal when the last digits are" 12 is the label
    view = group(boxed("2", "2"))
    texts = boxed("12", "12", "7", "7")
    assert SelfHarmonyReward()(group(texts, reframed=view)).rewards == [0.0] * 4
    last_digit = SelfHarmonyReward(equivalence=lambda a, b: a[-1] == b[-1])
    assert last_digit(group(texts, reframed=view)).rewards == [1.0, 1.0, 0.0, 0.0]


def test_every_view_is_read_from_its_own_rows():
    # three views: 5 is in all three (harmony 1 over shares 1/2, 1/2, 1), 3 only in two
    reward = SelfHarmonyReward(views={"reframed": "{prompt} again", "other": "{prompt} once more"})
    views = {"reframed": group(boxed("5", "3")), "other": group(boxed("5", "5"))}
    out = reward(group(boxed("3", "5"), **views))
    assert out.rewards == [0.0, 1.0]
    assert out.view_rewards == {"reframed": [1.0, 0.0], "other": [1.0, 1.0]}
    # harmony of 5: 3 / (2 + 2 + 1) = 0.6; of 3: 0 (absent from `other`)
    assert out.scores == pytest.approx([0.0, 0.6])


def test_what_self_harmony_reports_beside_its_rewards():
    out = SelfHarmonyReward()(
        group(boxed("2", "2", None, "6"), reframed=group(boxed("2", "6", "6", None)))
    )
    # 2: shares 1/2 and 1/4, harmony 2 / (2 + 4) = 1/3; 6: 1/4 and 1/2, also 1/3; the tie
    # goes to the larger total (equal: 3/4), then the first cluster: 2 (cluster 0)
    assert out.answers == ["2", "2", None, "6"]
    assert out.clusters == [0, 0, -1, 1]
    assert out.rewards == [1.0, 1.0, 0.0, 0.0]
    assert out.scores == pytest.approx([1 / 3, 1 / 3, 0.0, 1 / 3])
    assert out.components == {"harmony": out.scores}
    assert out.verdicts == [True, False]
    assert out.group_metrics == {"pseudo_label_found": 1.0, "view_answered_frac": 0.75}
