"""Every option of conf/reward builds and scores a group in every entry point that takes a
reward: train.py, `python -m covo.score`, `python -m covo.study`, `covo.analysis.outcomes` and
TRL's `CovoReward(<name>)`. A new reward YAML is covered without editing this file.

The oracle for the numbers is `covo.score` on the same responses and token ids: the reward a
training run, an outcome study's run or TRL builds from the same name gives the same rewards
(the random control too: its draws depend on the seed, the step, the rank and the group's
index only, and those are the same here)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import CONF_DIR, GROUPS_OF_FOUR, compose_config, grpo_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from covo.analysis.outcomes import check as check_outcomes
from covo.analysis.outcomes import compose_train, run_overrides
from covo.analysis.score import make_group, score
from covo.analysis.study import RESULTS_FILE, study
from covo.data.jsonl import DataError
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


@pytest.mark.parametrize("name", REWARDS)
def test_score(name, scored):
    assert [len(r) for r in scored[name]] == [N] * len(ITEMS)
    assert all(math.isfinite(r) for group in scored[name] for r in group)


@pytest.mark.parametrize("name", REWARDS)
def test_train_py(name, tiny_cfg, scored):
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
    module, datamodule, trainer = build(cfg)
    assert_scores_groups(rewards_of(module.reward, policy_of(module)), scored[name])
    trainer.fit(module, datamodule=datamodule)
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    (mean,) = [e.value for e in events.Scalars("reward/mean")]
    assert math.isfinite(mean)


@pytest.mark.parametrize("name", REWARDS)
def test_outcomes(name, tmp_path, scored):
    cfg = compose_config("outcomes", ["train.model=tiny", f"rewards=[{name}]", "seeds=1"], tmp_path)
    names, seeds = check_outcomes(cfg)  # composes and checks each run's whole config
    run_cfg = compose_train(run_overrides(cfg, name, seeds[0]))
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


class Recording:
    """The wrapped reward, keeping every group it was given."""

    def __init__(self, inner):
        self.inner, self.groups = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, group, scorer):
        self.groups.append(group)
        return self.inner(group, scorer)


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
    reward.reward = seen = Recording(judge)
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
        assert_scores_groups([out[:N], out[N:]], scored[name])
        return
    # TRL samples the original prompts only: the reward samples each view from the live policy,
    # N responses to the prompt put through the view's template
    assert len(out) == 2 * N and all(math.isfinite(r) for r in out)
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
