"""Every option of conf/reward builds and scores a group in every entry point that takes a
reward: train.py, `python -m covo.score`, `python -m covo.study`, `covo.analysis.outcomes` and
TRL's `CovoReward(<name>)`. A new reward YAML is covered without editing this file.

The fixture's groups are built so that the options give different rewards on them (every pair
except the ablations of the CoVo family, `covo` `consistency` `volatility` `covo_linear`
`covo_guarded`, which the random tiny model scores alike: those are told apart by their
configs, tests/test_reward_yaml_values.py). The rewards that follow from the answers alone are
written out by hand (`HAND`); the others' oracle is the option's reward built straight from its
YAML (`reference`) and called on the same responses and token ids. A training run records
every group its module scored during `fit`."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch
from conftest import CONF_DIR, GROUPS_OF_FOUR, compose_config, grpo_config
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_reward_yaml_values import DOCUMENTED, knob_values

from covo.analysis.outcomes import check as check_outcomes
from covo.analysis.outcomes import run_overrides
from covo.analysis.score import make_group, score
from covo.analysis.study import RESULTS_FILE, study
from covo.data.jsonl import DataError
from covo.infra.configs import compose_run
from covo.launch.train import build, resolve_auto
from covo.models.loading import build_tiny
from covo.rewards.base import label_for
from covo.rewards.covo.reward import encode
from covo.rewards.covo.scorer import PrefixSharedScorer
from covo.rollout.views import declared_views, view_groups

torch.set_num_threads(1)
REWARDS = sorted(path.stem for path in (CONF_DIR / "reward").glob("*.yaml"))
N = 4
VIEWS = [  # a reframed view's responses per item (self_harmony compares them)
    ["Restated: 7 + 12.\n7 + 12 = 19.\n\\boxed{19}", "\\boxed{18}"],
    ["Restated: 4 * 3.\n\\boxed{12}", "4 * 3 = 7.\n\\boxed{7}"],
]
ITEMS = [{**item, "views": {"reframed": view}} for item, view in zip(GROUPS_OF_FOUR, VIEWS)]
ITEMS += [
    {  # a one-line answer; a response whose last number (6) is not boxed; the label 6
        "prompt": "What is 2 + 3?",
        "responses": [
            "\\boxed{5}",
            "2 + 3 = 5.\nThe answer is: \\boxed{5}",
            "2 + 3 = 6.\nSo 6.",
            "Adding: 2 + 3.\nIt is 6.\nCheck: 6.\n\\boxed{6}",
        ],
        "answer": "6",
        "views": {"reframed": ["\\boxed{6}", "Restated: 3 + 2.\n\\boxed{6}"]},
    },
    {  # the majority (3), the label (8) and the answer of both views (9) all differ
        "prompt": "What is 4 + 4?",
        "responses": [
            "4 + 4 = 3.\n\\boxed{3}",
            "Four and four.\nThat is 3.\nThe answer is: \\boxed{3}",
            "4 + 4 = 8.\n\\boxed{8}",
            "4 + 4 = 9.\nSo the answer is: \\boxed{9}",
        ],
        "answer": "8",
        "views": {"reframed": ["\\boxed{9}", "Restated: 4 * 2.\n\\boxed{9}"]},
    },
]
# each response's answer as `boxed_or_last_number` reads it
ANSWERS = [
    ["19", "18", "19", None],
    ["12", "7", "12", "7"],
    ["5", "5", "6", "6"],
    ["3", "3", "8", "9"],
]


def restrain_by_hand(answers: list[str | None]) -> list[float]:
    """RESTRAIN with docs/rewards.md's constants: r_i = g(top share) * g(f_a) / sum_b g(f_b)
    for response i's answer a, g(f) = exp(-(f - 1)^2 / (2 * 0.5^2)); 0 without an answer; -0.5
    for every response when the top share is below 0.3."""
    shares = {a: c / N for a, c in Counter(a for a in answers if a is not None).items()}
    g = {a: math.exp(-((f - 1) ** 2) / 0.5) for a, f in shares.items()}
    top = max(shares.values())
    if top < 0.3:
        return [-0.5] * N
    u = math.exp(-((top - 1) ** 2) / 0.5)
    return [0.0 if a is None else u * g[a] / sum(g.values()) for a in answers]


def coins_by_hand(index: int) -> list[float]:
    """The random control's draws for group `index` at seed 0, step 0, rank 0 (docs/rewards.md:
    Bernoulli(0.5) from a generator seeded with "seed/step/rank/index")."""
    rng = random.Random(f"0/0/0/{index}")
    return [float(rng.random() < 0.5) for _ in range(N)]


# what the options give on ITEMS, from the answers alone (labels 19, 12, 6, 8; the reframed
# view's answers 19 18, 12 7, 6 6, 9 9)
HAND = {
    "majority": [[1, 0, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]],
    "vote_share": [[0.5, 0.25, 0.5, 0], [0.5] * 4, [0.5] * 4, [0.5, 0.5, 0.25, 0.25]],
    "ground_truth": [[1, 0, 1, 0], [1, 0, 1, 0], [0, 0, 1, 1], [0, 0, 1, 0]],
    "negated_ground_truth": [[-1, 0, -1, 0], [-1, 0, -1, 0], [0, 0, -1, -1], [0, 0, -1, 0]],
    "format": [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 1, 1]],  # a box, whatever is in it
    "self_harmony": [[1, 0, 1, 0], [1, 0, 1, 0], [0, 0, 1, 1], [0, 0, 0, 1]],
    "restrain": [restrain_by_hand(answers) for answers in ANSWERS],
    "random": [coins_by_hand(index) for index in range(len(ANSWERS))],
}
# rewards the tiny model cannot tell apart on ITEMS (see the module's docstring)
ALIKE = {"covo", "consistency", "volatility", "covo_linear", "covo_guarded"}


def reference(name: str, tmp_path: Path):
    """The option's reward built from its YAML alone (seed 0), not through an entry point."""
    return hydra.utils.instantiate(
        compose_config("train", [f"reward={name}", "seed=0"], tmp_path).reward
    )


def test_every_reward_option_is_covered():
    # the parametrisation reads the folder: it finds the rewards the README lists
    assert {"random", "covo", "majority", "ground_truth", "self_harmony"} <= set(REWARDS)
    assert len(REWARDS) >= 18


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> dict[str, list[list[float]]]:
    """covo.score's rewards per reward name: one list of N rewards per item (model=tiny)."""
    tmp = tmp_path_factory.mktemp("score")
    tokenizer = build_tiny().tokenizer
    source = tmp / "in.jsonl"
    lines = [
        json.dumps({**i, "response_ids": [encode(tokenizer, t) for t in i["responses"]]})
        for i in ITEMS
    ]
    source.write_text("\n".join(lines) + "\n")
    out = {}
    for name in REWARDS:
        target = tmp / f"{name}.jsonl"
        overrides = ["model=tiny", "device=cpu", "threads=1", "seed=0", f"reward={name}"]
        overrides += [f"input={source}", f"output={target}", "prompt_template='{problem}'"]
        score(compose_config("score", overrides, tmp / name))
        records = [json.loads(line) for line in target.read_text().splitlines()]
        out[name] = [[r["reward"] for r in record["responses"]] for record in records]
    return out


def rewards_of(reward, loaded) -> list[list[float]]:
    """`reward` on the groups of ITEMS as covo.score builds them (step 0, rank 0, index = the
    item's position, as the score command numbers its groups)."""
    scorer = PrefixSharedScorer(loaded.model, loaded.tokenizer)
    out = []
    for index, item in enumerate(ITEMS):
        ids = [encode(loaded.tokenizer, t) for t in item["responses"]]
        group = make_group(
            loaded, item["prompt"], item["responses"], label_for(reward, item["answer"]), ids
        )
        group.views = view_groups(loaded, item["prompt"], item, declared_views(reward), None)
        group.step, group.rank, group.index = 0, 0, index
        out.append(reward(group, scorer).rewards)
    return out


def policy_of(module) -> SimpleNamespace:
    """The module's policy as a loaded model (model, tokenizer, chat template)."""
    return SimpleNamespace(
        model=module.policy, tokenizer=module.tokenizer, chat_template=module.chat_template
    )


def assert_scores_groups(rewards: list[list[float]], expected: list[list[float]]):
    assert [len(r) for r in rewards] == [N] * len(ITEMS)
    assert all(math.isfinite(r) for group in rewards for r in group)
    assert rewards == [pytest.approx(e, abs=1e-6) for e in expected]


def test_the_fixture_tells_the_options_apart(scored):
    alike = [
        (a, b)
        for i, a in enumerate(REWARDS)
        for b in REWARDS[i + 1 :]
        if scored[a] == scored[b] and not {a, b} <= ALIKE
    ]
    assert not alike


@pytest.mark.parametrize("name", REWARDS)
def test_score(name, scored, tmp_path):
    by_hand = HAND.get(name)
    expected = by_hand or rewards_of(reference(name, tmp_path), build_tiny())
    assert_scores_groups(scored[name], expected)


class Recording:
    """The wrapped reward, keeping every group it was given and the rewards it gave; with a
    `reference`, also the rewards that one gives the same group with the same scorer."""

    def __init__(self, inner, reference=None):
        self.inner, self.reference = inner, reference
        self.groups, self.rewards, self.expected = [], [], []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, group, scorer):
        result = self.inner(group, scorer)
        self.groups.append(group)
        self.rewards.append(list(result.rewards))
        if self.reference is not None:
            self.expected.append(list(self.reference(group, scorer).rewards))
        return result


@pytest.mark.parametrize("name", REWARDS)
def test_train_py(name, tiny_cfg, scored, tmp_path):
    cfg = tiny_cfg(
        f"reward={name}",
        "seed=0",
        "trainer.max_steps=1",
        "data.batch_size=1",
        "rollout.max_new_tokens=8",
        "val_every_n_rollouts=100",
        "export_dir=null",
        "callbacks=none",
        "algorithm.filter.drop_all_zero=false",  # the random tiny model earns no reward
    )
    named = compose_config("train", [f"reward={name}"], tmp_path / "named").reward
    assert OmegaConf.to_container(cfg.reward) == OmegaConf.to_container(named)
    module, datamodule, trainer = build(cfg)
    cls, values = DOCUMENTED[name]
    assert f"{type(module.reward).__module__}.{type(module.reward).__name__}" == cls
    values = {k: 0 if k == "seed" else v for k, v in values.items()}  # the run's seed
    assert knob_values(module.reward, values) == values
    assert_scores_groups(rewards_of(module.reward, policy_of(module)), scored[name])
    module.reward = seen = Recording(module.reward, reference(name, tmp_path))
    trainer.fit(module, datamodule=datamodule)
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    (mean,) = [e.value for e in events.Scalars("reward/mean")]
    assert len(seen.groups) == 1 and len(seen.rewards[0]) == cfg.rollout.num_samples
    assert seen.rewards == [pytest.approx(e, abs=1e-6) for e in seen.expected]
    expected = [r for rewards in seen.expected for r in rewards]
    assert mean == pytest.approx(math.fsum(expected) / len(expected), abs=1e-5)


@pytest.mark.parametrize("name", REWARDS)
def test_outcomes(name, tmp_path, scored):
    cfg = compose_config("outcomes", ["train.model=tiny", f"rewards=[{name}]", "seeds=1"], tmp_path)
    names, seeds = check_outcomes(cfg)  # composes and checks each run's whole config
    run_cfg = compose_run("train", run_overrides(cfg, name, seeds[0]))
    run_cfg.paths.output_dir = str(tmp_path / "run")
    resolve_auto(run_cfg)
    module, _, _ = build(run_cfg)
    assert names == [name] and run_cfg.seed == 0
    assert_scores_groups(rewards_of(module.reward, policy_of(module)), scored[name])


@pytest.fixture(scope="module")
def study_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("study_cache")


@pytest.mark.parametrize("name", REWARDS)
def test_study(name, tmp_path, study_cache):
    overrides = [
        "model=tiny",
        "device=cpu",
        "threads=1",
        "problems.num_problems=2",
        "sampling.num_samples=4",
        "sampling.max_new_tokens=16",
        "bootstrap.resamples=50",
        f"paths.cache_dir={study_cache}",  # sampled once, then read by every reward's study
        f"rewards=[{name}]",
        "baseline=null",
    ]
    results = study(compose_config("study", overrides, tmp_path))
    written = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert list(written["rewards"]) == [name]
    assert [len(p["rewards"][name]["scores"]) for p in results["prompts"]] == [N, N]


@pytest.mark.parametrize("name", REWARDS)
def test_trl(name, tmp_path, scored):
    pytest.importorskip("trl")
    from covo.integrations.trl import CovoReward, grpo_trainer

    loaded = build_tiny()
    reward = CovoReward(name)
    args = grpo_config(tmp_path, max_completion_length=8, max_steps=1)
    from datasets import Dataset

    data = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": i["prompt"]}], "answer": i["answer"]}
            for i in ITEMS
        ]
    )
    trainer = grpo_trainer(
        reward, model=loaded.model, processing_class=loaded.tokenizer, args=args, train_dataset=data
    )
    prompts, completions, ids, answers = [], [], [], []
    for item in ITEMS:
        for text in item["responses"]:
            prompts.append([{"role": "user", "content": item["prompt"]}])
            completions.append([{"role": "assistant", "content": text}])
            ids.append(encode(loaded.tokenizer, text) + [loaded.tokenizer.eos_token_id])
            answers.append(item["answer"])
    judge = reward.reward
    reward.reward = seen = Recording(judge, reference(name, tmp_path))
    out = reward(
        prompts=prompts,
        completions=completions,
        completion_ids=ids,
        answer=answers,
        trainer_state=trainer.state,
        log_metric=lambda key, value: None,
    )
    views = declared_views(judge)
    if not views:
        assert_scores_groups([out[i : i + N] for i in range(0, len(out), N)], scored[name])
        return
    # TRL samples the original prompts only: the reward samples each view from the live policy,
    # N responses to the prompt put through the view's template; the rewards are the option's
    # own on the groups (and views) it was given
    assert out == pytest.approx([r for rewards in seen.expected for r in rewards], abs=1e-6)
    assert len(out) == len(ITEMS) * N and len(seen.groups) == len(ITEMS)
    for group, item in zip(seen.groups, ITEMS):
        for view, template in views.items():
            sampled = group.views[view]
            prompt = loaded.tokenizer.decode(sampled.prompt_ids)
            assert template.replace("{prompt}", item["prompt"]) in prompt
            assert len(sampled.texts) == N and len(sampled.token_logprobs) == N


def test_score_names_the_line_that_lacks_the_views_a_reward_compares(tmp_path):
    source = tmp_path / "in.jsonl"
    lines = [json.dumps(ITEMS[0]), json.dumps({k: v for k, v in ITEMS[1].items() if k != "views"})]
    source.write_text("\n".join(lines) + "\n")
    target = tmp_path / "out.jsonl"
    overrides = ["model=tiny", "device=cpu", "threads=1", "reward=self_harmony"]
    overrides += [f"input={source}", f"output={target}"]
    with pytest.raises(DataError, match=r"in.jsonl:2: 'views.reframed' must list the responses"):
        score(compose_config("score", overrides, tmp_path))
    assert len(target.read_text().splitlines()) == 1  # the first line's output is kept
