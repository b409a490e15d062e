"""The held-out evaluation callback and the labs' test split: metrics by hand on fixed
responses, records per split and their resume, generation on the rollout's replica, the random
generators it leaves as they were, its seeds, the same records from 2 gloo processes as from
one, and a test split that shares no problem with pretraining, training or validation."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import hydra
import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from conftest import ROOT, TINY_RUN, compose_config
from hydra.errors import InstantiationException
from safetensors.torch import load_file

import covo.callbacks.heldout_eval as heldout_module
from covo.answers import AnswerEquivalence, get_extractor
from covo.callbacks.heldout_eval import (
    HeldoutEval,
    evaluation_seed,
    problem_results,
    read_records,
    split_metrics,
)
from covo.data.arithmetic import generate
from covo.data.datamodule import PromptDataModule
from covo.infra.errors import SettingError, one_line
from covo.models import toy_reasoner
from covo.rollout.engine import HFGenerate
from covo.rollout.sampler import RolloutSampler

# three problems, four samples each, and a greedy response; the extractor reads the last box,
# else the last number
SAMPLED = [
    ["\\boxed{5}", "the answer is 5", "\\boxed{6}", "no answer here"],  # 5, 5, 6, none
    ["\\boxed{7}", "\\boxed{7}", "\\boxed{12}", "\\boxed{12.0}"],  # a 2-2 tie: 7 came first
    ["so 4", "\\boxed{-4}", "\\boxed{3}", "\\boxed{4}"],  # 4, -4, 3, 4: none is -3
]
GREEDY = ["\\boxed{5}", "\\boxed{7}", "x = -3"]
LABELS = ["5", "12", "-3"]
# correct samples 2, 2, 0; greedy right on problems 1 and 3; majority (5, 7, 4) on problem 1
PER_PROBLEM = {"per_problem_correct": [2, 2, 0], "per_problem_greedy": [1, 0, 1],
               "per_problem_maj": [1, 0, 0]}  # fmt: skip
EXPECTED = {"sampled_accuracy": 4 / 12, "greedy_accuracy": 2 / 3, "maj_accuracy": 1 / 3,
            "pass_accuracy": 2 / 3}  # fmt: skip


def test_metrics_by_hand_on_three_problems_of_four_samples():
    extract = get_extractor("boxed_or_last_number")
    results = problem_results(SAMPLED, GREEDY, LABELS, extract, AnswerEquivalence())
    assert results == PER_PROBLEM
    assert split_metrics(results, 4) == pytest.approx(EXPECTED)


class Replica(torch.nn.Linear):
    """Stands for the rollout's replica: the view hands it out, counting refreshes."""


def stub_module(refreshes: list) -> SimpleNamespace:
    replica = Replica(1, 1)

    def view(policy):
        refreshes.append(policy)
        return replica

    sampler = SimpleNamespace(view=view, cfg=SimpleNamespace(engine="the rollout's engine"))
    policy = torch.nn.Linear(1, 1)
    return SimpleNamespace(policy=policy, tokenizer=None, chat_template=False, sampler=sampler)


def callback_of(path: Path, test: bool = True, every: int = 2, seed: int = 0) -> HeldoutEval:
    validation = [{"problem": f"p{i}", "answer": a} for i, a in enumerate(LABELS)]
    test_split = [{"problem": f"t{i}", "answer": a} for i, a in enumerate(LABELS)]
    return HeldoutEval(validation, test_split if test else None, "Q: {problem}\n", every, 4, 16,
                       1.0, 2, "boxed_or_last_number", seed, str(path))  # fmt: skip


def test_the_callback_writes_one_line_per_split_and_resumes(tmp_path, monkeypatch):
    calls = []

    def sample_responses(loaded, prompts, cfg, desc, engine):  # the stubbed sampler
        calls.append((type(loaded.model).__name__, engine, prompts, cfg.num_samples))
        rows = [int(p[-2]) for p in prompts]  # "Q: p1\n" -> 1
        texts = [SAMPLED[r] if cfg.temperature > 0 else [GREEDY[r]] for r in rows]
        return texts, [[False] * len(t) for t in texts]

    monkeypatch.setattr(heldout_module, "sample_responses", sample_responses)
    path, refreshes = tmp_path / "heldout.jsonl", []
    callback, module = callback_of(path), stub_module(refreshes)
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))
    trainer = SimpleNamespace(global_step=0, global_rank=0, world_size=1, is_global_zero=True,
                              loggers=[logger])  # fmt: skip
    callback.on_train_start(trainer, module)
    for step in range(1, 6):  # optimizer steps 1..5: evaluations at 2 and 4, then 5 at the end
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, None, step - 1)
    callback.on_train_end(trainer, module)
    records = read_records(path)
    assert [(r["step"], r["split"]) for r in records] == [
        (s, split) for s in (0, 2, 4, 5) for split in ("validation", "test")
    ]
    assert records[1] == {"step": 0, "split": "test", "problems": 3, "num_samples": 4,
                          **EXPECTED, **PER_PROBLEM}  # fmt: skip
    # one refresh of the replica per evaluation; chunks of 2 problems through the engine
    assert len(refreshes) == 4 and refreshes[0] is module.policy
    assert calls[0] == ("Replica", "the rollout's engine", ["Q: p0\n", "Q: p1\n"], 4)
    assert [c[2] for c in calls[:8]] == [["Q: p0\n", "Q: p1\n"]] * 2 + [["Q: p2\n"]] * 2 + [
        ["Q: t0\n", "Q: t1\n"]
    ] * 2 + [["Q: t2\n"]] * 2
    assert [s for s, _ in logged] == [0, 2, 4, 5]
    assert logged[0][1]["heldout/test/pass_accuracy"] == pytest.approx(2 / 3)
    assert logged[0][1]["heldout/validation/maj_accuracy"] == pytest.approx(1 / 3)
    # resumed from a checkpoint at step 2: the evaluations after it are redone, per split
    trainer.global_step = 2
    callback.on_train_start(trainer, module)
    assert [(r["step"], r["split"]) for r in read_records(path)] == [
        (s, split) for s in (0, 2) for split in ("validation", "test")
    ]
    assert len(refreshes) == 4  # step 2 was evaluated before the checkpoint: not redone


def test_lines_without_a_split_are_validation_and_resume_adds_the_test_split(tmp_path, monkeypatch):
    def sample_responses(loaded, prompts, cfg, desc, engine):
        texts = [
            SAMPLED[int(p[-2])] if cfg.temperature > 0 else [GREEDY[int(p[-2])]] for p in prompts
        ]
        return texts, [[False] * len(t) for t in texts]

    monkeypatch.setattr(heldout_module, "sample_responses", sample_responses)
    path = tmp_path / "heldout.jsonl"
    old = [{"step": s, "sampled_accuracy": 0.5, "greedy_accuracy": 0.5, "maj_accuracy": 0.5}
           for s in (0, 5, 10)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in old))
    assert [r["split"] for r in read_records(path)] == ["validation"] * 3
    trainer = SimpleNamespace(global_step=5, global_rank=0, world_size=1, is_global_zero=True,
                              loggers=[])  # fmt: skip
    callback_of(path).on_train_start(trainer, stub_module([]))
    # step 10 dropped; validation at 5 kept, test evaluated there; the readers of curves
    # take validation only
    assert [(r["step"], r["split"]) for r in read_records(path)] == [
        (0, "validation"),
        (5, "validation"),
        (5, "test"),
    ]
    assert [r["step"] for r in read_records(path, split="validation")] == [0, 5]
    assert read_records(path, split="test")[0]["per_problem_correct"] == [2, 2, 0]


def test_bad_settings_name_their_key(tmp_path):
    with pytest.raises(ValueError, match="every_n_optimizer_steps"):
        callback_of(tmp_path / "h.jsonl", every=-1)
    with pytest.raises(ValueError, match="callbacks.heldout_eval.seed must be an integer >= 0"):
        callback_of(tmp_path / "h.jsonl", seed=-3)
    with pytest.raises(ValueError, match="callbacks.heldout_eval.test: no items"):
        HeldoutEval([{"problem": "p", "answer": "1"}], [], "{problem}", 1, 1, 1, 1.0, 1,
                    "boxed", 0, str(tmp_path / "h.jsonl"))  # fmt: skip


def test_seeds_of_neighbouring_runs_and_steps_differ():
    # the old seed, seed + step, gave seed 0 at step 5 the draws of seed 1 at step 4
    assert 0 + 5 == 1 + 4
    assert evaluation_seed(0, 5, "validation", 0) != evaluation_seed(1, 4, "validation", 0)
    seeds = {
        evaluation_seed(s, t, split, c)
        for s in range(10)
        for t in range(0, 100, 5)
        for split in ("validation", "test")
        for c in range(4)
    }
    assert len(seeds) == 10 * 20 * 2 * 4
    assert all(0 <= s < 2**64 for s in seeds)


# the packaged toy reasoner with a real rollout sampler: real generation on the CPU
def toy_module() -> SimpleNamespace:
    loaded = toy_reasoner.load()
    sampler = RolloutSampler(
        loaded.tokenizer, loaded.chat_template, SimpleNamespace(dtype=None, engine=HFGenerate())
    )
    return SimpleNamespace(
        policy=loaded.model.train(),
        tokenizer=loaded.tokenizer,
        chat_template=loaded.chat_template,
        sampler=sampler,
    )


def toy_problems(n: int, skip: int = 0) -> list[dict]:
    settings = {**toy_reasoner.Lab().problems(), "split": "val"}
    return generate(n, seed=0, distinct=True, skip=skip, **settings)


def toy_callback(path: Path, seed: int = 0, validation: int = 5, test: int = 3):
    return HeldoutEval(toy_problems(validation), toy_problems(test, skip=1024),
                       toy_reasoner.prompt_template(), 5, 4, 48, 1.0, 2, "boxed", seed,
                       str(path))  # fmt: skip


def trainer_at(step: int, rank: int = 0, world: int = 1) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, global_rank=rank, world_size=world,
                           is_global_zero=rank == 0, loggers=[])  # fmt: skip


def draws() -> tuple:
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()


def test_an_evaluation_leaves_every_generator_as_it_was(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    module = toy_module()
    real = heldout_module.sample_responses

    def touches_every_generator(*args):  # an engine may draw from Python's and NumPy's too
        random.random(), np.random.rand()
        return real(*args)

    monkeypatch.setattr(heldout_module, "sample_responses", touches_every_generator)
    states = []
    for evaluate in (False, True):
        torch.manual_seed(11), random.seed(11), np.random.seed(11)
        draws()  # some training before the evaluation
        if evaluate:
            toy_callback(tmp_path / "h.jsonl").on_train_start(trainer_at(0), module)
        states.append(draws())
    assert states[0] == states[1]
    records = read_records(tmp_path / "h.jsonl")
    assert [r["split"] for r in records] == ["validation", "test"]
    assert module.policy.training  # train mode restored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_an_evaluation_on_a_gpu_leaves_its_generator_as_it_was(tmp_path):
    module = toy_module()
    module.policy.cuda()
    torch.cuda.manual_seed_all(11)
    before = torch.cuda.get_rng_state_all()
    toy_callback(tmp_path / "h.jsonl").on_train_start(trainer_at(0), module)
    after = torch.cuda.get_rng_state_all()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert [r["split"] for r in read_records(tmp_path / "h.jsonl")] == ["validation", "test"]


def test_neighbouring_seeds_and_steps_sample_apart(tmp_path, monkeypatch):
    """Seed 0 at step 5 and seed 1 at step 4 shared every draw under seed + step."""
    torch.set_num_threads(1)
    module, texts = toy_module(), []
    real = heldout_module.sample_responses

    def spy(loaded, prompts, cfg, desc, engine):
        out = real(loaded, prompts, cfg, desc, engine)
        if cfg.temperature > 0:
            texts[-1].append(out[0])
        return out

    monkeypatch.setattr(heldout_module, "sample_responses", spy)
    for run, (seed, step) in enumerate(((0, 5), (1, 4), (0, 5))):
        texts.append([])
        callback = toy_callback(tmp_path / f"{run}.jsonl", seed, validation=2, test=1)
        callback.on_train_start(trainer_at(step), module)
    assert texts[0] == texts[2]  # the same (seed, step): the same samples
    assert texts[0] != texts[1]


def _rank_worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                  world_size=2)  # fmt: skip
    try:
        module, generated = toy_module(), []
        real = heldout_module.sample_responses

        def spy(loaded, prompts, cfg, desc, engine):
            generated.extend(prompts if cfg.temperature > 0 else [])
            return real(loaded, prompts, cfg, desc, engine)

        heldout_module.sample_responses = spy
        toy_callback(Path(out) / "heldout.jsonl").on_train_start(trainer_at(0, rank, 2), module)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(generated))
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.slow  # about 90 s on a busy 2-core machine: two processes load torch and the lab
def test_two_gloo_processes_write_the_records_of_one(tmp_path):
    torch.set_num_threads(1)
    single = tmp_path / "single"
    toy_callback(single / "heldout.jsonl").on_train_start(trainer_at(0), toy_module())
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), str(ranks)), nprocs=2)
    assert (ranks / "heldout.jsonl").read_text() == (single / "heldout.jsonl").read_text()
    records = read_records(single / "heldout.jsonl")
    assert [r["problems"] for r in records] == [5, 3]
    # not a trivial record: some problems right in some samples, others not
    assert len(set(records[0]["per_problem_correct"])) > 1
    # chunks of 2 problems dealt in turn: validation 0-1, 4 and test 0-1 to rank 0
    template = toy_reasoner.prompt_template()
    validation = [template.format(problem=p["problem"]) for p in toy_problems(5)]
    test = [template.format(problem=p["problem"]) for p in toy_problems(3, skip=1024)]
    rank0 = json.loads((ranks / "rank0.json").read_text())
    rank1 = json.loads((ranks / "rank1.json").read_text())
    assert sorted(rank0) == sorted(validation[:2] + validation[4:] + test[:2])
    assert sorted(rank1) == sorted(validation[2:4] + test[2:])


@pytest.mark.parametrize(
    "model, data, sizes", [("toy_reasoner", "toy_arithmetic", (64, 64)),
                           ("toy_calibrated", "toy_calibrated", (128, 128))]
)  # fmt: skip
def test_the_test_split_shares_no_problem_text(model, data, sizes, tmp_path):
    cfg = compose_config("train", [f"model={model}", f"data={data}"], tmp_path)
    texts = {
        split: [item["problem"] for item in hydra.utils.instantiate(cfg.data[split])]
        for split in ("train", "val", "test")
    }
    record = json.loads((toy_reasoner.WEIGHTS / model / "pretraining.json").read_text())
    names = [f.name for f in fields(toy_reasoner.Lab)]
    lab = toy_reasoner.Lab(**{k: record[k] for k in names})
    prompts = {prompt for prompt, _ in toy_reasoner.corpus(lab, lab.steps * lab.batch_size)}
    pretraining = {p.removeprefix("Question: ").strip() for p in prompts}
    assert (len(texts["val"]), len(texts["test"])) == sizes
    assert len(set(texts["test"])) == sizes[1]
    assert len(pretraining) > 10_000
    test = set(texts["test"])
    assert (
        not test & pretraining and not test & set(texts["train"]) and not test & set(texts["val"])
    )
    other_seed = {i["problem"] for i in generate(2000, seed=7, split="train",
                                                              **lab.problems())}  # fmt: skip
    assert not test & other_seed
    # validation is the list it was before the test split existed
    digest = hashlib.sha256(json.dumps(hydra.utils.instantiate(cfg.data.val)).encode())
    assert digest.hexdigest()[:16] == {"toy_arithmetic": "8b461e8cf6527e6e",
                                       "toy_calibrated": "1fb185339d42ec05"}[data]  # fmt: skip


def test_a_test_split_that_overlaps_validation_stops_the_run(tmp_path):
    cfg = compose_config("train", ["model=toy_reasoner", "data=toy_arithmetic",
                                   "data.test.skip=32"], tmp_path)  # fmt: skip
    with pytest.raises(InstantiationException) as err:
        hydra.utils.instantiate(cfg.data)
    assert one_line(err.value) == (
        "error: data.test shares 32 of its 64 problems with data.val: draw it from another part"
        " or past that split's problems (data.test.skip)"
    )
    train = [
        {"problem": "Compute 1 + 1.", "answer": "2"},
        {"problem": "Compute 2 + 2.", "answer": "4"},
    ]
    with pytest.raises(SettingError, match="data.test shares 1 of its 1 problems with data.train"):
        PromptDataModule(train=train, val=[], test=train[1:])


RESUMED_RUN = [
    *TINY_RUN,
    "data=toy_arithmetic",
    "data.val.num_problems=4",
    "data.test.num_problems=3",
    "reward=self_certainty",
    "scheduler=constant",
    "optimizer.lr=1e-3",  # steps that move the weights
    "trainer.precision=32-true",
    "threads=1",
    "val_every_n_rollouts=100",
    "callbacks.model_checkpoint.every_n_steps=1",
]
WATCHED = [
    "callbacks=heldout_eval",
    "callbacks.model_checkpoint.every_n_steps=1",
    "callbacks.heldout_eval.every_n_optimizer_steps=2",
    "callbacks.heldout_eval.num_samples=3",
    "callbacks.heldout_eval.batch_size=2",
]


def train(run_dir: Path, *overrides: str) -> None:
    command = [sys.executable, "train.py", *RESUMED_RUN, f"hydra.run.dir={run_dir}", *overrides]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=600)


@pytest.mark.slow
def test_a_resumed_run_writes_the_records_of_the_uninterrupted_one_and_trains_alike(tmp_path):
    straight, resumed, unwatched = tmp_path / "straight", tmp_path / "resumed", tmp_path / "none"
    train(straight, *WATCHED, "trainer.max_steps=4")
    train(resumed, *WATCHED, "trainer.max_steps=2")
    checkpoint = resumed / "checkpoints" / "step_000002.ckpt"
    train(resumed, *WATCHED, "trainer.max_steps=4", f"ckpt_path={checkpoint}")
    train(unwatched, "trainer.max_steps=4")
    records = read_records(straight / "heldout.jsonl")
    assert [(r["step"], r["split"]) for r in records] == [
        (s, split) for s in (0, 2, 4) for split in ("validation", "test")
    ]
    assert (resumed / "heldout.jsonl").read_text() == (straight / "heldout.jsonl").read_text()
    weights = [load_file(d / "hf_model" / "model.safetensors") for d in (straight, unwatched)]
    for name in weights[0]:  # evaluating changed nothing the run trained on
        assert torch.equal(weights[0][name], weights[1][name]), name
