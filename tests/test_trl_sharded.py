"""covo rewards under sharded parameters (FSDP2 on 2 gloo processes, CPU): each process scores
its own groups with its own number of forwards, without a hang, and the rewards equal those of
the whole model; a real GRPOTrainer run under accelerate's FSDP2 plugin does the same. Under
DeepSpeed ZeRO-3 (not installed here) one gathering of every parameter holds a call's forwards."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from conftest import ROOT
from test_trl_integration import N, oracle_group, trainer_with, trl_rows

pytest.importorskip("trl")
from covo.integrations.trl import CovoReward  # noqa: E402
from covo.integrations.trl.capture import complete_in_step, own_rows  # noqa: E402
from covo.models.loading import build_tiny  # noqa: E402
from covo.rewards.base import label_for  # noqa: E402
from covo.rewards.covo.scorer import NaiveScorer  # noqa: E402
from covo.rollout.context_cache import cache_of, with_cache


def run_ranks(script: str, *args: str, timeout: int = 300) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    script = str(Path(__file__).with_name(script))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", script]
    try:
        done = subprocess.run(
            [*command, *args], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the sharded run hung (processes out of step on their forwards)")
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["covo_paper"])
def test_fsdp2_processes_with_different_forward_counts_score_as_the_whole_model(name, tmp_path):
    run_ranks("trl_fsdp_ranks.py", str(tmp_path), name)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["was_sharded"]
        assert rank["local_numel"] < rank["numel"]  # each process holds a part only
        assert rank["sharded"] == pytest.approx(rank["whole"], abs=1e-5)
    assert len(ranks[0]["whole"]) == 8 and len(ranks[1]["whole"]) == 4
    assert len(set(ranks[0]["whole"])) > 1
    # the processes ran different numbers of forwards, sharded as whole
    assert ranks[0]["forwards"][1] == ranks[0]["forwards"][0]
    assert ranks[1]["forwards"][1] == ranks[1]["forwards"][0]
    assert ranks[0]["forwards"][0] != ranks[1]["forwards"][0]


def oracle_rewards(call: dict, weights: dict, temperature: float) -> list[float]:
    """The call's rewards in one process from the weights the call scored with, in float64:
    per completion one forward over prompt + completion (`oracle_group`), CoVo's distances
    from `NaiveScorer` (each state and branch fed whole)."""
    loaded = build_tiny()
    loaded.model.load_state_dict(weights)
    model, tokenizer = loaded.model.double().eval(), loaded.tokenizer
    judge = CovoReward("covo").reward
    eos, out = tokenizer.eos_token_id, []
    for s in range(0, len(call["prompt_ids"]), N):
        rows = call["completion_ids"][s : s + N]
        responses = [ids[:-1] if ids and ids[-1] == eos else ids for ids in rows]
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in responses]
        group = oracle_group(model, call["prompt_ids"][s], responses, texts, temperature)
        group = replace(group, truth=label_for(judge, None))
        out += judge(group, NaiveScorer(model, tokenizer)).rewards
    return out


@pytest.mark.slow
def test_grpo_training_under_accelerates_fsdp2_plugin_scores_as_one_process(tmp_path):
    """Two GRPO steps (`trainer.train()`) with the covo reward, its capture installed, under
    accelerate's FSDP2 plugin on 2 gloo processes (tests/trl_fsdp_train_ranks.py says what
    differs from a GPU run). Rank 1's rows all end after 6 tokens while rank 0 decodes 16, and
    in the first step the statistics come from the batched forwards at 20 tokens a forward, so
    the processes run different numbers of forwards: the run ends, the parameters stay sharded,
    and every reward returned and logged equals a single-process float64 oracle of the same
    completions at the weights of its step."""
    run_ranks("trl_fsdp_train_ranks.py", str(tmp_path), timeout=420)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    weights = [torch.load(tmp_path / f"weights{step}.pt") for step in range(2)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # trained
    oracle = [
        [oracle_rewards(rank["calls"][step], weights[step], rank["temperature"]) for rank in ranks]
        for step in range(2)
    ]
    for r, rank in enumerate(ranks):
        assert (rank["distributed_type"], rank["fsdp_version"]) == ("DistributedType.FSDP", 2)
        assert rank["step"] == 2 and len(rank["calls"]) == 2
        for step, call in enumerate(rank["calls"]):
            for when in ("before", "after"):  # each process holds a part of the parameters
                assert call[when]["local"] < call[when]["full"], (r, step, when)
            assert call["after"]["dtensor"]
            assert call["logged"]["perf/stats_from_generate"] == float(step == 1)
            assert call["rewards"] == pytest.approx(oracle[step][r], abs=1e-5), (r, step)
            mean = sum(oracle[step][r]) / len(oracle[step][r])
            assert call["logged"]["reward/mean"] == pytest.approx(mean, abs=1e-5)
    for step in range(2):  # TRL's mean over the processes
        logged = [e for e in ranks[0]["log_history"] if e.get("step") == step + 1]
        both = oracle[step][0] + oracle[step][1]
        assert logged[0]["rewards/covo/mean"] == pytest.approx(sum(both) / len(both), abs=1e-5)
    first = [rank["calls"][0] for rank in ranks]
    assert len(set(oracle[0][0] + oracle[0][1])) > 1  # the rewards tell completions apart
    assert max(map(len, first[0]["completion_ids"])) == 16
    assert max(map(len, first[1]["completion_ids"])) == 6  # rank 1's rows all ended early
    assert first[0]["forwards"] != first[1]["forwards"]


class ZeroThree:
    """The trainer's accelerator as under DeepSpeed ZeRO-3 (its state's `deepspeed_plugin` at
    stage 3), everything else the real one's."""

    def __init__(self, inner):
        self.inner = inner
        self.state = SimpleNamespace(
            deepspeed_plugin=SimpleNamespace(zero_stage=3), fsdp_plugin=None
        )

    def __getattr__(self, name):
        return getattr(self.inner, name)


def fake_deepspeed(events: list) -> ModuleType:
    """A `deepspeed` module whose `zero.GatheredParameters` records what it gathers and when
    it releases them into `events` (DeepSpeed is not installed here)."""

    @contextlib.contextmanager
    def gathered(params, modifier_rank=None, fwd_module=None, enabled=True):
        events.append(("gather", {id(p) for p in params}))
        yield
        events.append(("release",))

    module = ModuleType("deepspeed")
    module.__spec__ = ModuleSpec("deepspeed", None)  # found, with no installed metadata
    module.zero = SimpleNamespace(GatheredParameters=gathered)
    return module


def test_under_zero3_one_gathering_holds_every_forward_of_a_call(tmp_path, monkeypatch):
    """ZeRO-3's path (DeepSpeed itself cannot run here): each call gathers every parameter of
    the policy once, before its first forward, and releases them after its last; gradient
    checkpointing is off for the call's forwards and back on after with the trainer's own
    settings (TRL forces use_reentrant=True under peft and ZeRO-3); the rewards are those of
    the unsharded path."""
    events = []
    reward = CovoReward("covo_paper", ["stats_token_budget=40"])
    trainer = trainer_with(reward, tmp_path, gradient_checkpointing_kwargs={"use_reentrant": True})
    model = trainer.model
    model.gradient_checkpointing_enable(trainer.args.gradient_checkpointing_kwargs)
    inputs, prompts, completions, ids = trl_rows(trainer.processing_class)
    call = dict(prompts=prompts, completions=completions, completion_ids=ids)
    plain = reward(**call)
    assert events == []  # no gathering without ZeRO-3
    monkeypatch.setitem(sys.modules, "deepspeed", fake_deepspeed(events))  # TRL built first
    trainer.accelerator = ZeroThree(trainer.accelerator)
    model.model.register_forward_pre_hook(
        lambda module, args: events.append(("forward", model.is_gradient_checkpointing))
    )
    for _ in range(2):
        gathered = reward(**call)
        assert gathered == pytest.approx(plain, abs=1e-6)
    assert len(set(plain)) > 1
    calls = [events[: len(events) // 2], events[len(events) // 2 :]]
    for first, *forwards, last in calls:
        assert first == ("gather", {id(p) for p in model.parameters()})
        assert last == ("release",)
        assert len(forwards) > 2 and set(forwards) == {("forward", False)}
    assert model.is_gradient_checkpointing
    layer = model.model.layers[0]
    assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": True}


def test_the_completing_forward_of_a_process_whose_rows_ended_early(tmp_path):
    """Under sharding generate decodes in step: a process whose rows all ended has fed its
    last token (and copies of it after) while the others decode on. Its completing forward
    still runs, once, and each row's kept keys and values are those of one forward over its
    prompt + response (1e-5)."""
    model = build_tiny().model.eval()
    prompts = [[1, 87, 85, 265, 201], [1, 33, 2, 201, 1, 279, 85]]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=5,
            return_dict_in_generate=True,
        )
        sequences, cache = out.sequences, cache_of(out)
        for _ in range(2):  # the finished process decodes on: its last token, then again
            columns = cache.get_seq_length() + 1
            full_mask = torch.cat([mask, mask.new_ones(2, columns - width)], 1)
            model(
                input_ids=sequences[:, -1:],
                attention_mask=full_mask,
                position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)[:, -1:],
                **with_cache(cache),
            )
    assert cache.get_seq_length() == sequences.shape[1] + 1
    forwards = []
    model.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    with torch.no_grad():
        cache = complete_in_step(model, cache, sequences, mask)
    assert len(forwards) == 1
    rows = [(p + sequences[r, width:].tolist(), width - len(p)) for r, p in enumerate(prompts)]
    for (ids, _), context in zip(rows, own_rows(cache, rows, "cpu"), strict=True):
        with torch.no_grad():
            whole = cache_of(model(input_ids=torch.tensor([ids]), use_cache=True))
        for (keys, values), layer in zip(context.layers, whole.layers, strict=True):
            assert torch.allclose(keys, layer.keys, atol=1e-5, rtol=0)
            assert torch.allclose(values, layer.values, atol=1e-5, rtol=0)
