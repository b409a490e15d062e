"""covo rewards as TRL GRPOTrainer rewards: the same numbers as `python -m covo.score`, the
live policy left as it was, whole groups or a one-line refusal, labels for ground truth only."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import GROUPS_OF_FOUR, ROOT, compose_config, grpo_config

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402  (installed with trl)

from covo.analysis.score import make_group, score  # noqa: E402
from covo.integrations.trl import (  # noqa: E402
    GROUP_KEYS,
    CovoReward,
    check_whole_groups,
    grpo_trainer,
)
from covo.models.loading import LoadedModel, build_tiny  # noqa: E402
from covo.models.lora import MissingExtraError, merged_state  # noqa: E402
from covo.rewards.base import Group, Withheld, label_for  # noqa: E402
from covo.rewards.covo.reward import encode  # noqa: E402
from covo.rewards.covo.scorer import PrefixSharedScorer  # noqa: E402
from covo.rollout.context_cache import cache_of
from covo.rollout.groups import STAT_FIELDS, group_from_ids, response_stats  # noqa: E402
from covo.rollout.sampling import format_prompts  # noqa: E402

torch.set_num_threads(1)
N = 4
ITEMS = GROUPS_OF_FOUR


def dataset() -> Dataset:
    return Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": i["prompt"]}], "answer": i["answer"]}
            for i in ITEMS
        ]
    )


def trainer_with(reward: CovoReward, tmp: Path, loaded=None, **changes):
    loaded = loaded or build_tiny()
    return grpo_trainer(
        reward,
        model=loaded.model,
        processing_class=loaded.tokenizer,
        args=grpo_config(tmp, **changes),
        train_dataset=dataset(),
    )


def trl_rows(tokenizer, eos: bool = True):
    """What `_calculate_rewards` receives for ITEMS: rows prompt-major, each completion's ids
    ending with the EOS token (the last response of each group: truncated, without it)."""
    inputs, prompts, completions, ids = [], [], [], []
    for item in ITEMS:
        for k, text in enumerate(item["responses"]):
            prompt = [{"role": "user", "content": item["prompt"]}]
            inputs.append({"prompt": prompt, "answer": item["answer"]})
            prompts.append(prompt)
            completions.append([{"role": "assistant", "content": text}])
            ended = eos and k < N - 1
            ids.append(encode(tokenizer, text) + ([tokenizer.eos_token_id] if ended else []))
    return inputs, prompts, completions, ids


def covo_score(tmp: Path, reward: str) -> list[dict]:
    """The oracle: `python -m covo.score` on the same responses and ids (model=tiny, seed 0)."""
    source, target = tmp / "in.jsonl", tmp / "out.jsonl"
    tokenizer = build_tiny().tokenizer
    lines = [
        json.dumps({**i, "response_ids": [encode(tokenizer, t) for t in i["responses"]]})
        for i in ITEMS
    ]
    source.write_text("\n".join(lines) + "\n")
    overrides = ["model=tiny", "device=cpu", "threads=1", f"reward={reward}"]
    overrides += [f"input={source}", f"output={target}", "prompt_template='{problem}'"]
    score(compose_config("score", overrides, tmp))
    return [json.loads(line) for line in target.read_text().splitlines()]


@pytest.mark.parametrize("name", ["covo", "covo_paper", "majority", "self_certainty"])
def test_rewards_through_trl_equal_the_score_command(name, tmp_path):
    reward = CovoReward(name)
    trainer = trainer_with(reward, tmp_path)
    logged = {}
    inputs, prompts, completions, ids = trl_rows(trainer.processing_class)
    out = reward(
        prompts=prompts,
        completions=completions,
        completion_ids=ids,
        answer=[x["answer"] for x in inputs],
        trainer_state=trainer.state,
        log_metric=lambda key, value: logged.setdefault(key, value),
    )
    through_trl = trainer._calculate_rewards(inputs, prompts, completions, ids)[:, 0].tolist()
    records = covo_score(tmp_path, name)
    expected = [r["reward"] for record in records for r in record["responses"]]
    assert len(set(expected)) > 1  # the responses are told apart
    assert out == pytest.approx(expected, abs=1e-6)
    assert through_trl == pytest.approx(expected, abs=1e-6)
    assert logged["reward/mean"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    if name.startswith("covo"):
        volatility = [r["volatility"] for rec in records for r in rec["responses"]]
        volatility = [v for v in volatility if v is not None]
        assert logged["reward/volatility"] == pytest.approx(sum(volatility) / len(volatility))
        assert "diag/accuracy" in logged and "perf/scoring_tokens" in logged


def test_the_policy_scores_in_eval_mode_without_grad_and_is_left_training(tmp_path):
    reward = CovoReward("covo_paper")
    trainer = trainer_with(reward, tmp_path)
    model = trainer.model
    model.train()
    seen = {"model": [], "body": []}
    hooks = [
        module.register_forward_pre_hook(
            lambda module, args, key=key: seen[key].append(
                (module.training, torch.is_grad_enabled())
            )
        )
        for key, module in [("model", model), ("body", model.model)]
    ]
    inputs, prompts, completions, ids = trl_rows(trainer.processing_class)
    rewards = trainer._calculate_rewards(inputs, prompts, completions, ids)
    for hook in hooks:
        hook.remove()
    # per group: its prompt once, then its 4 completions in one batched forward; and CoVo's
    # scorer: all through the body, the output head applied to the positions scored
    assert len(seen["body"]) > 2 * 2
    assert set(seen["model"]) | set(seen["body"]) == {(False, False)}
    assert all(module.training for module in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert rewards.grad_fn is None and not rewards.requires_grad


def oracle_group(model, prompt_ids, response_ids, texts, temperature) -> Group:
    """The per-completion path: one forward over prompt + response per response, the
    statistics computed here from its logits (float64), no keys or values kept."""
    fields = {name: [] for name in ("token_logprobs", "token_entropy", "token_self_certainty")}
    for ids in response_ids:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids + ids])).logits[0]
        logp = (logits[len(prompt_ids) - 1 : -1].double() / temperature).log_softmax(-1)
        fields["token_logprobs"].append(logp[torch.arange(len(ids)), ids].float())
        fields["token_entropy"].append(-(logp.exp() * logp).sum(-1).float())
        certainty = -logp.mean(-1) - math.log(logp.shape[-1])
        fields["token_self_certainty"].append(certainty.float())
    return Group(list(prompt_ids), [list(r) for r in response_ids], list(texts), **fields)


def fed_tokens(model) -> list[tuple[int, int]]:
    """(rows, columns) of every input the model's body is called with, recorded from now on."""
    shapes = []
    model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    return shapes


@pytest.mark.parametrize("budget", [1, 60, 2048])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_batched_statistics_equal_one_forward_per_completion(budget, temperature):
    """Log-probs, entropy and self-certainty, and the keys and values of prompt + response,
    equal those of one forward over prompt + response each (fp32, 1e-5); `token_budget`
    bounds every batched forward's rows x columns (one row may exceed it)."""
    loaded = build_tiny()
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    [chat] = format_prompts(tokenizer, [ITEMS[0]["prompt"]], True)
    prompt_ids = encode(tokenizer, chat)
    responses = [encode(tokenizer, t) for t in ITEMS[0]["responses"]] + [[]]
    shapes = fed_tokens(model)
    stats, caches = response_stats(model, prompt_ids, responses, temperature, True, budget)
    prompt_forward, *batched = shapes
    assert prompt_forward == (1, len(prompt_ids) - 1)  # the prompt once for the group
    assert all(rows == 1 or rows * cols <= budget for rows, cols in batched)
    assert sum(rows for rows, _ in batched) == len(responses) - 1  # every non-empty once
    assert len(batched) == {1: 4, 60: 2, 2048: 1}[budget]
    oracle = oracle_group(model, prompt_ids, responses, [""] * len(responses), temperature)
    for i, ids in enumerate(responses):
        for field, name in STAT_FIELDS.items():
            expected = getattr(oracle, field)[i]
            assert stats[i][name].shape == expected.shape == (len(ids),)
            assert torch.allclose(stats[i][name], expected, atol=1e-5, rtol=0), (i, name)
        if not ids:
            assert caches[i] is None
            continue
        assert caches[i].ids == prompt_ids + ids
        with torch.no_grad():
            full = cache_of(model(input_ids=torch.tensor([prompt_ids + ids]), use_cache=True))
        for (keys, values), layer in zip(caches[i].layers, full.layers):
            assert torch.allclose(keys, layer.keys, atol=1e-5, rtol=0)
            assert torch.allclose(values, layer.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["self_certainty", "entropy", "seq_logprob", "covo_paper"])
def test_rewards_that_read_token_statistics_equal_the_per_completion_path(name, tmp_path):
    """Every reward that reads token statistics (covo_paper: curiosity from the log-probs, and
    the scorer reading the kept keys and values) gives through TRL, at TRL's temperature, the
    rewards of the per-completion path (1e-5); CoVo's distance matrices are unchanged."""
    reward = CovoReward(name)
    trainer = trainer_with(reward, tmp_path, temperature=0.7)
    model, tokenizer = trainer.model, trainer.processing_class
    inputs, prompts, completions, ids = trl_rows(tokenizer)
    got = trainer._calculate_rewards(inputs, prompts, completions, ids)[:, 0].tolist()
    prompt_ids = trainer._tokenize_prompts(prompts)[0]
    model.eval()
    scorer = PrefixSharedScorer(model, tokenizer)
    expected, matrices = [], []
    for g, item in enumerate(ITEMS):
        responses = [encode(tokenizer, text) for text in item["responses"]]
        args = (list(prompt_ids[g * N]), responses, item["responses"])
        truth = label_for(reward.reward, None)
        naive = reward.reward(replace(oracle_group(model, *args, 0.7), truth=truth), scorer)
        batched = reward.reward(
            group_from_ids(model, *args, truth, keep_cache=True, temperature=0.7), scorer
        )
        expected += naive.rewards
        assert batched.rewards == pytest.approx(naive.rewards, abs=1e-5)
        if name == "covo_paper":
            for a, b in zip(batched.details["D"], naive.details["D"]):
                assert (a is None) == (b is None)
                if a is not None:
                    assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
            matrices += [d for d in naive.details["D"] if d is not None]
    assert len(set(expected)) > 1
    assert got == pytest.approx(expected, abs=1e-5)
    if name == "covo_paper":
        assert matrices  # distances were compared


def adapted_tiny(dropout: float = 0.0):
    """The tiny model with LoRA adapters whose B is random (so they change the policy)."""
    pytest.importorskip("peft")
    lora = {"r": 4, "alpha": 8, "dropout": dropout, "target_modules": "all-linear"}
    adapted = build_tiny(lora=lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return adapted


def test_under_peft_the_adapted_policy_scores(tmp_path):
    """With LoRA adapters (B random, so they change the policy), the rewards are those of the
    merged model scored by covo's own code, and not those of the base model."""
    adapted = adapted_tiny()
    reward = CovoReward("covo_paper")
    trainer = trainer_with(reward, tmp_path, adapted)
    inputs, prompts, completions, ids = trl_rows(adapted.tokenizer)
    rewards = trainer._calculate_rewards(inputs, prompts, completions, ids)[:, 0].tolist()

    def own_rewards(loaded: LoadedModel) -> list[float]:
        loaded.model.eval()
        scorer = PrefixSharedScorer(loaded.model, loaded.tokenizer)
        out = []
        for item in ITEMS:
            response_ids = [encode(loaded.tokenizer, t) for t in item["responses"]]
            group = make_group(loaded, item["prompt"], item["responses"], None, response_ids)
            out += reward.reward(group, scorer).rewards
        return out

    merged = build_tiny()
    merged.model.load_state_dict(merged_state(adapted.model, adapted.model.state_dict()))
    assert rewards == pytest.approx(own_rewards(merged), abs=1e-6)
    assert rewards != pytest.approx(own_rewards(build_tiny()), abs=1e-3)


def test_without_trl_one_line_names_the_extra(monkeypatch):
    import covo.integrations.trl as integration

    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now fails
    importlib.reload(integration)  # the module itself imports without TRL
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(MissingExtraError, match=r"^covo.integrations.trl needs TRL: .*\[trl\]"):
        integration.CovoReward("covo")
    with pytest.raises(MissingExtraError, match=r"\[trl\]"):
        integration.grpo_trainer(None)


def test_bind_refuses_a_setup_that_can_split_a_group():
    reward = CovoReward("majority")
    args = SimpleNamespace(per_device_train_batch_size=2, steps_per_generation=1)
    trainer = SimpleNamespace(reward_funcs=[reward], args=args, num_generations=4)
    with pytest.raises(ValueError) as err:
        reward.bind(trainer)
    message = str(err.value)
    assert "\n" not in message
    for key in GROUP_KEYS.replace(" and ", ", ").split(", "):
        assert key in message
    check_whole_groups(2, 2, 4)  # 4 rows per process: whole groups
    check_whole_groups(4, 1, 4)
    with pytest.raises(ValueError, match="6 is not a multiple of num_generations"):
        check_whole_groups(3, 2, 4)


@pytest.mark.parametrize("order", ["short", "interleaved"])
def test_calls_refuse_rows_that_are_not_whole_groups(order, tmp_path):
    reward = CovoReward("covo")
    trainer = trainer_with(reward, tmp_path)
    inputs, prompts, completions, ids = trl_rows(trainer.processing_class)
    rows = list(range(N // 2)) if order == "short" else [0, 1, 2, 4, 3, 5, 6, 7]
    with pytest.raises(ValueError, match="per_device_train_batch_size x steps_per_generation"):
        reward(
            prompts=[prompts[r] for r in rows],
            completions=[completions[r] for r in rows],
            completion_ids=[ids[r] for r in rows],
            answer=[inputs[r]["answer"] for r in rows],
        )


class LabelSpy:
    """A reward that records what it is given of each group's label, then judges as `inner`
    (declaring what `inner` declares)."""

    def __init__(self, inner):
        self.inner, self.truths = inner, []
        self.needs_labels = getattr(inner, "needs_labels", False)

    def __call__(self, group, scorer):
        self.truths.append(group.truth)
        return self.inner(group, scorer)


@pytest.mark.parametrize("name", ["ground_truth", "majority", "covo"])
def test_labels_reach_only_ground_truth(name, tmp_path):
    reward = CovoReward(name)
    trainer = trainer_with(reward, tmp_path)
    spy = reward.reward = LabelSpy(reward.reward)
    inputs, prompts, completions, ids = trl_rows(trainer.processing_class)
    rewards = trainer._calculate_rewards(inputs, prompts, completions, ids)[:, 0].tolist()
    if name == "ground_truth":
        assert spy.truths == ["19", "12"]
        assert rewards == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]  # \boxed{19} / \boxed{12}
    else:
        assert [type(truth) for truth in spy.truths] == [Withheld, Withheld]


def test_ground_truth_without_the_label_column_names_it(tmp_path):
    reward = CovoReward("ground_truth", ["label_column=solution"])
    trainer = trainer_with(reward, tmp_path)
    inputs, prompts, completions, ids = trl_rows(trainer.processing_class)
    with pytest.raises(ValueError, match="no column 'solution' \\(label_column\\)"):
        reward(prompts=prompts, completions=completions, completion_ids=ids, answer=["19"] * 8)


def test_a_reward_yaml_of_ones_own_and_bad_names(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("_target_: covo.rewards.majority.MajorityReward\nextractor: boxed\n")
    assert CovoReward(str(path)).__name__ == "mine"
    with pytest.raises(ValueError, match="no conf/reward/nope.yaml"):
        CovoReward("nope")
    with pytest.raises(ValueError, match="no such file"):
        CovoReward(str(tmp_path / "missing.yaml"))


def test_the_default_runs_covo_reads_the_last_number():
    # reward=covo_last_number (the default run's CoVo) reads the last number without a box
    assert CovoReward("covo_last_number").reward.extract("3 + 4 = 7.") == "7"
    assert CovoReward("covo").reward.extract("3 + 4 = 7.") is None  # the released last box


def test_an_unbound_reward_says_so():
    with pytest.raises(ValueError, match="bind"):
        CovoReward("covo")(prompts=["a"] * N, completions=["b"] * N, completion_ids=[[1]] * N)


def test_two_grpo_steps_with_covo_on_cpu(tmp_path):
    reward = CovoReward("covo")
    trainer = trainer_with(reward, tmp_path)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "rewards/covo/mean" in entry]
    assert len(logs) == 2 and trainer.state.global_step == 2
    for entry in logs:
        assert entry["rewards/covo/mean"] == pytest.approx(entry["reward/mean"])
        assert entry["time/reward_s"] > 0
        assert 0.0 <= entry["reward/answered_frac"] <= 1.0
    assert trainer.model.training


@pytest.mark.slow
def test_two_processes_keep_groups_whole_and_refuse_a_split(tmp_path):
    """Two gloo processes: 4 rows per process keep the groups of 4 whole (each call sees its
    own whole groups, no prompt on both ranks); 2 rows per process are refused at bind."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    script = Path(__file__).with_name("trl_ranks.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)]
    done = subprocess.run([*command, str(tmp_path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in seen:
        assert rank["world"] == 2
        assert rank["refused"].startswith("covo rewards need whole groups")
        assert len(rank["calls"]) == 2
        for call in rank["calls"]:
            assert len(call) == 4 and len(set(call)) == 1  # one whole group
    for step in range(2):
        assert seen[0]["calls"][step][0] != seen[1]["calls"][step][0]


@pytest.mark.slow
def test_smollm2_end_to_end_script():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    script = ROOT / "scripts" / "trl_covo.py"
    done = subprocess.run(
        [sys.executable, str(script), "--steps", "2", "--max-new-tokens", "48"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 2
    assert all("reward/mean" in line and "time/reward_s" in line for line in steps)
    assert not math.isnan(float(steps[-1].split("reward/mean ")[1].split(",")[0]))
