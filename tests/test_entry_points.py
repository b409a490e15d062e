"""Every option of conf/reward builds and scores a group in every entry point that takes a
reward: train.py, `python -m covo.score`, `python -m covo.study`, `covo.analysis.outcomes` and
TRL's `CovoReward(<name>)`. A new reward YAML is covered without editing this file.

The fixture's groups are built so that every two options give different rewards on them
(`test_the_fixture_tells_the_options_apart`), the ablations of the CoVo family included: its
last two groups are made of trajectories whose states lean to one answer or the other, on
which the aggregations part. The rewards that follow from the answers alone are written out by
hand (`HAND`), those of the CoVo family on those two groups from the states' leanings
(`COVO_HAND`); the others' oracle is the option's reward built straight from its YAML
(`reference`) and called on the same responses and token ids. A training run records
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
from omegaconf import OmegaConf, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_reward_yaml_values import DOCUMENTED, knob_values

from covo.analysis.outcomes import check as check_outcomes
from covo.analysis.outcomes import run_overrides
from covo.analysis.score import make_group, score
from covo.analysis.study import RESULTS_FILE, study
from covo.analysis.study_samples import samples_path
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
    # Two groups on which the CoVo aggregations part. The tiny model (seed 0) leans to 3 or to
    # 8 state by state; with ">" a state closer to the other answer, "<" to the own one
    # (released distances; the closest pair of distances 0.0018 apart, in means of about 6):
    {  # 8: ">><<<" (Con 3/5, Vol 2/5) and ">>><<" (2/5, 3/5); 3: "<<<>>" (3/5, 1)
        "prompt": "What is 4 + 4?",
        "responses": [
            "4 + 4 = 8.\n4 + 4 = 9.\nFour and four.\nHmm, wait.\nSo the answer is: \\boxed{8}",
            "Check: 9.\nYes.\nLet me see.\nFour and four.\nSo the answer is: \\boxed{8}",
            "Check: 9.\nLet me see.\nThat is 3.\nFour and four.\nSo the answer is: \\boxed{3}",
            "No idea.",
        ],
        "answer": "8",
        "views": {"reframed": ["\\boxed{3}", "Restated: 4 * 2.\n\\boxed{3}"]},
    },
    {  # 8: "><<" (2/3, 1/3); 3: "<<<" and the one-line "<" (1, 0)
        "prompt": "What is 4 + 4?",
        "responses": [
            "So 8.\nFour and four.\n\\boxed{8}",
            "Restated: 4 * 2.\nMaybe 3.\n\\boxed{3}",
            "\\boxed{3}",
            "No idea.",
        ],
        "answer": "8",
        "views": {"reframed": ["\\boxed{8}", "4 * 2 = 8.\n\\boxed{8}"]},
    },
]
# each response's answer as `boxed_or_last_number` reads it
ANSWERS = [
    ["19", "18", "19", None],
    ["12", "7", "12", "7"],
    ["5", "5", "6", "6"],
    ["3", "3", "8", "9"],
    ["8", "8", "3", None],
    ["8", "3", "3", None],
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


# what the options give on ITEMS, from the answers alone (labels 19, 12, 6, 8, 8, 8; the
# reframed view's answers 19 18, 12 7, 6 6, 9 9, 3 3, 8 8)
HAND = {
    "majority": [
        [1, 0, 1, 0],
        [1, 0, 1, 0],
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 1, 1, 0],
    ],
    "vote_share": [
        [0.5, 0.25, 0.5, 0],
        [0.5] * 4,
        [0.5] * 4,
        [0.5, 0.5, 0.25, 0.25],
        [0.5, 0.5, 0.25, 0],
        [0.25, 0.5, 0.5, 0],
    ],
    "ground_truth": [
        [1, 0, 1, 0],
        [1, 0, 1, 0],
        [0, 0, 1, 1],
        [0, 0, 1, 0],
        [1, 1, 0, 0],
        [1, 0, 0, 0],
    ],
    "negated_ground_truth": [
        [-1, 0, -1, 0],
        [-1, 0, -1, 0],
        [0, 0, -1, -1],
        [0, 0, -1, 0],
        [-1, -1, 0, 0],
        [-1, 0, 0, 0],
    ],
    # a box, whatever is in it
    "format": [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]],
    "self_harmony": [
        [1, 0, 1, 0],
        [1, 0, 1, 0],
        [0, 0, 1, 1],
        [0, 0, 0, 1],
        [0, 0, 1, 0],
        [1, 0, 0, 0],
    ],
    "restrain": [restrain_by_hand(answers) for answers in ANSWERS],
    "random": [coins_by_hand(index) for index in range(len(ANSWERS))],
}
# The CoVo family on the last two groups, from the leanings noted there (binary at 0.5; linear
# RiL = mean Con - mean Vol at 0.05; covo_guarded: only the best cluster passes, one-line
# trajectories do not vouch). Group 4: the cluster 8 has mean Con 1/2, mean 1 - Vol 1/2 and
# RiV = |(3/5 e^{0.4i} + 2/5 e^{0.6i}) / 2| = 0.4976; the cluster 3 has Con 3/5, 1 - Vol 0,
# RiV 3/5. Group 5: cluster 8 (2/3, 1/3), cluster 3 (1, 0) where covo_guarded counts the
# two-line trajectory only, and the best cluster is 3.
COVO_HAND = {
    "covo": [[0, 0, 1, 0], [1, 1, 1, 0]],
    "covo_last_number": [[0, 0, 1, 0], [1, 1, 1, 0]],  # every answer there is boxed
    "consistency": [[1, 1, 1, 0], [1, 1, 1, 0]],
    "volatility": [[1, 1, 0, 0], [1, 1, 1, 0]],
    "covo_linear": [[0, 0, 0, 0], [1, 1, 1, 0]],
    "covo_guarded": [[0, 0, 1, 0], [0, 1, 1, 0]],
}
LEANINGS = [[">><<<", ">>><<", "<<<>>", None], ["><<", "<<<", "<", None]]
# Options that give the same rewards on every group by design: none. Each option differs from
# every other in a knob that changes some group's rewards.
SAME_BY_DESIGN: set[frozenset[str]] = set()


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
def score_records(tmp_path_factory) -> dict[str, list[dict]]:
    """covo.score's output records per reward name, one per item (model=tiny)."""
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
        out[name] = [json.loads(line) for line in target.read_text().splitlines()]
    return out


@pytest.fixture(scope="module")
def scored(score_records) -> dict[str, list[list[float]]]:
    """covo.score's rewards per reward name: one list of N rewards per item."""
    return {
        name: [[r["reward"] for r in record["responses"]] for record in records]
        for name, records in score_records.items()
    }


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
        if scored[a] == scored[b] and frozenset((a, b)) not in SAME_BY_DESIGN
    ]
    assert not alike


@pytest.mark.parametrize("name", sorted(COVO_HAND))
def test_covo_family_on_the_leaning_groups(name, score_records):
    records = score_records[name][-2:]
    for record, leanings in zip(records, LEANINGS):
        # every one of these options reads the distances as covo does
        leaning = [
            None if r["ratios"] is None else "".join("<" if x < 1 else ">" for x in r["ratios"])
            for r in record["responses"]
        ]
        assert leaning == leanings
    assert [[r["reward"] for r in record["responses"]] for record in records] == COVO_HAND[name]


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


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("name", REWARDS)
def test_study(name, tmp_path, score_records):
    """covo.study with ITEMS as its samples (and the reframed view's beside them) gives every
    prompt the scores and cluster verdicts covo.score gives the same responses."""
    tokenizer = build_tiny().tokenizer
    problems = [{"problem": i["prompt"], "answer": i["answer"]} for i in ITEMS]
    samples = [
        {"prompt": i["prompt"], "answer": i["answer"], "responses": i["responses"],
         "response_ids": [encode(tokenizer, t) for t in i["responses"]]}
        for i in ITEMS
    ]  # fmt: skip
    overrides = [
        "model=tiny",
        "device=cpu",
        "threads=1",
        "seed=0",
        "prompt_template='{problem}'",
        f"sampling.num_samples={N}",
        "bootstrap.resamples=20",
        f"samples={write_jsonl(tmp_path / 'samples.jsonl', samples)}",
        f"rewards=[{name}]",
        "baseline=null",
    ]
    cfg = compose_config("study", overrides, tmp_path)
    with open_dict(cfg):
        cfg.problems = {
            "_target_": "covo.data.jsonl.read_jsonl",
            "path": str(write_jsonl(tmp_path / "problems.jsonl", problems)),
        }
    for template in declared_views(reference(name, tmp_path)).values():
        view = [{"prompt": i["prompt"], "responses": i["views"]["reframed"]} for i in ITEMS]
        write_jsonl(samples_path(cfg, template), view)
    results = study(cfg)
    written = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert list(written["rewards"]) == [name]
    scores, hits = [], []
    for record in score_records[name]:
        responses, clusters = record["responses"], record["clusters"]
        scores.append([r["score"] for r in responses if r["score"] is not None])
        judged = len(clusters) >= 2 and all(c["verdict"] is not None for c in clusters)
        hits.append(sum(c["verdict"] == c["correct"] for c in clusters) if judged else 0)
    if name == "random":  # covo.score numbers its groups; the study scores each as group 0
        scores, hits = [coins_by_hand(0)] * len(ITEMS), None
    prompts = [p["rewards"][name] for p in results["prompts"]]
    assert [p["scores"] for p in prompts] == [pytest.approx(s, abs=1e-6) for s in scores]
    if hits is not None:
        assert [p["hits"] for p in prompts] == hits


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
