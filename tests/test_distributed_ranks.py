"""What each rank does on its own and what the ranks agree on, in two real gloo processes:
random streams per rank, validation split across ranks, one gradient reduction per optimizer
step, and the collapse guard's decision."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
from datetime import timedelta
from functools import partial
from types import SimpleNamespace

import lightning.pytorch as L
import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from conftest import compose_config
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.overrides.distributed import prepare_for_backward
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import OmegaConf
from test_distributed_grads import batch, full_grads, grads_for
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.device_mesh import init_device_mesh

import covo
from covo.algorithms.update import UpdatePlan
from covo.algorithms.updater import Updater
from covo.callbacks.collapse import Verdict
from covo.callbacks.collapse_guard import HEALTHY, PRE_COLLAPSE, CollapseGuard
from covo.infra import distributed as dist
from covo.launch.train import build
from covo.models.loading import build_tiny

# the toy reasoner answers most validation problems right (a split that averaged each rank's
# mean would show); one problem per batch: no padding, so batching changes no greedy token
RUN = [
    "experiment=toy_reasoner_learns",
    "data.val.num_problems=7",
    "data.val_batch_size=1",
    "callbacks=none",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "threads=1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_lightning_process(rank: int, port: int) -> None:
    """What a launcher sets for Lightning to join a 2-process run instead of starting one."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)


class DrawAtStart(Callback):
    """Records a draw of each generator when training starts, then stops before any step."""

    def __init__(self, draws: list) -> None:
        self.draws = draws

    def on_train_start(self, trainer, pl_module) -> None:
        self.draws.append((torch.rand(3).tolist(), float(np.random.rand()), random.random()))
        trainer.should_stop = True


class CountValidated(Callback):
    def __init__(self) -> None:
        self.problems = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.problems += len(batch["prompt"])


def validated(trainer, module, datamodule) -> dict:
    counter = CountValidated()
    trainer.callbacks.append(counter)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return {"problems": counter.problems} | {
        k: float(v) for k, v in trainer.callback_metrics.items()
    }


def _worker(rank, port, tmp, strategy, results) -> None:
    """Two fits that stop at their first step, each recording a draw; then a validation."""
    as_lightning_process(rank, port)
    draws = []
    for run in range(2):  # the second run must draw what the first did
        cfg = compose_config("train", [*RUN, f"strategy={strategy}"], tmp / f"{rank}-{run}")
        L.seed_everything(cfg.seed, verbose=False)  # as `train` does
        module, datamodule, trainer = build(cfg)
        trainer.callbacks.append(DrawAtStart(draws))
        trainer.fit(module, datamodule=datamodule)
    results[rank] = {"draws": draws, "validation": validated(trainer, module, datamodule)}
    os._exit(0)  # see test_distributed_grads: freeing the gloo group can hang


RUNS: dict[str, dict] = {}
# FSDP2 needs a second pair of processes: slow
STRATEGIES = ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)]


def two_processes(strategy: str, tmp_path_factory) -> dict:
    """Each rank's record of `_worker` under `strategy` (run once per strategy)."""
    if strategy not in RUNS:
        tmp = tmp_path_factory.mktemp(strategy)
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(_worker, args=(free_port(), tmp, strategy, results), nprocs=2)
            RUNS[strategy] = dict(results)
    return RUNS[strategy]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ranks_draw_their_own_reproducible_streams(strategy, tmp_path_factory):
    records = two_processes(strategy, tmp_path_factory)
    for rank in (0, 1):
        first, rerun = records[rank]["draws"]
        assert first == rerun
    (torch0, numpy0, python0), (torch1, numpy1, python1) = (
        records[rank]["draws"][0] for rank in (0, 1)
    )
    assert torch0 != torch1
    assert numpy0 != numpy1
    assert python0 != python1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_validation_splits_the_problems_and_pools_them(strategy, tmp_path_factory, tmp_path):
    records = two_processes(strategy, tmp_path_factory)
    cfg = compose_config("train", RUN, tmp_path)
    module, datamodule, trainer = build(cfg)
    alone = validated(trainer, module, datamodule)
    assert alone["problems"] == 7
    assert 0 < alone["val/accuracy"] < 1  # else any pooling gives the same number
    assert [records[rank]["validation"]["problems"] for rank in (0, 1)] == [4, 3]
    for rank in (0, 1):
        got = records[rank]["validation"]
        for name in ("val/accuracy", "val/len_mean", "val/accuracy_best"):
            assert got[name] == pytest.approx(alone[name], rel=1e-6), (rank, name)


ALGORITHM = OmegaConf.create(
    {"loss_agg": "token_mean", "clip_eps": 0.2, "kl_coef": 0.0, "mask_truncated": False}
)


class RecordingOptimizer:
    """Lightning's optimizer step as the updater sees it (clip first), recording each step's
    gradients and how many all-reduces had run by then; the weights stay as they are."""

    def __init__(self, model, updater, reduces: list) -> None:
        self.model, self.updater, self.reduces = model, updater, reduces
        self.param_groups = [{"lr": 0.0}]
        self.steps = []

    def step(self) -> None:
        self.updater.clip_gradients()
        self.steps.append((full_grads(self.model), len(self.reduces)))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)


def accumulated_step(model, rows, ddp=None, reduces=None, local=contextlib.nullcontext):
    """One optimizer step of `Updater.update` over `rows` of the shared batch, in micro-batches
    of 2; the backward is Lightning's under DDP (the reducer prepared at each backward)."""
    sequences, attention, mask, advantages = batch()
    rollout = SimpleNamespace(
        sequences=sequences[rows],
        attention_mask=attention[rows],
        response_mask=mask[rows],
        logprobs=torch.zeros_like(mask[rows], dtype=torch.float32),
    )
    updater = Updater(model, None, ALGORITHM, 1.0, 6, False, max_grad_norm=1e9)
    optimizer = RecordingOptimizer(model, updater, reduces if reduces is not None else [])
    local_rows = torch.arange(len(rows))
    plan = UpdatePlan(keep=torch.ones(len(rows), dtype=torch.bool))
    plan.epochs = [[[local_rows[i : i + 2] for i in range(0, len(rows), 2)]]]

    def backward(loss):
        if ddp is not None:
            prepare_for_backward(ddp, loss)
        loss.backward()

    scheduler = SimpleNamespace(step=lambda: None)
    metrics = updater.update(rollout, advantages[rows], plan, optimizer, scheduler, backward, local)
    return optimizer.steps[0], metrics


def _accumulation_worker(rank, init_file, results) -> None:
    torch_dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    torch.set_num_threads(1)
    model = build_tiny(seed=0).model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    reduces = []

    def counting(state, bucket):
        reduces.append(bucket.index())
        return allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, counting)
    rows = torch.arange(rank * 4, rank * 4 + 4)
    record = {}
    for name, local in [
        ("each", contextlib.nullcontext),  # a reduction per backward, as before
        ("once", partial(dist.local_gradients, ddp, model)),
    ]:
        before = len(reduces)
        (grads, reduced), _ = accumulated_step(model, rows, ddp, reduces, local)
        record[name] = {"grads": grads, "reduces": reduced - before, "buckets": set(reduces)}
    # FSDP2 holding unsharded gradients until the step's last micro-batch
    sharded = build_tiny(seed=0).model.train()
    dist.shard(sharded, init_device_mesh("cpu", (2,)))
    local = partial(dist.local_gradients, None, sharded, sharded_too=True)
    (grads, _), _ = accumulated_step(sharded, rows, local=local)
    record["fsdp"] = {"grads": grads}
    results[rank] = record
    os._exit(0)  # see test_distributed_grads: freeing the gloo group can hang


def test_gradients_are_reduced_once_per_optimizer_step(tmp_path):
    """Two micro-batches per rank, a step over 8 rows: the single-process gradient of the
    whole batch (one forward), with one all-reduce per bucket instead of one per backward;
    FSDP2 accumulating unsharded gradients gives it too."""
    torch.set_num_threads(1)
    model = build_tiny(seed=0).model.train()
    grads_for(model, torch.arange(8), micro=8, world=1, loss_agg="token_mean")
    want = full_grads(model)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_accumulation_worker, args=(str(tmp_path / "init"), results), nprocs=2)
        results = dict(results)
    for rank in (0, 1):
        each, once = results[rank]["each"], results[rank]["once"]
        buckets = len(once["buckets"])
        assert each["reduces"] == 2 * buckets  # the reduction per micro-batch this replaces
        assert once["reduces"] == buckets
        fsdp = results[rank]["fsdp"]
        for name in want:
            for got in (each["grads"][name], once["grads"][name], fsdp["grads"][name]):
                torch.testing.assert_close(got, want[name], rtol=1e-4, atol=1e-7, msg=name)
    assert max(g.abs().max() for g in want.values()) > 1e-3


HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")
# covo's own files, wherever the checkout lives (a folder named covo holds the venv too)
COVO_FILES = os.path.dirname(covo.__file__) + os.sep


def test_the_update_reads_the_device_once(monkeypatch):
    """Two optimizer steps of two micro-batches each: one read to the host in all (a read per
    micro-batch waits for the device each time)."""
    torch.set_num_threads(1)
    reads = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(COVO_FILES):
                reads.append((_name, caller))
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    model = build_tiny(seed=0).model.train()
    (_, _), metrics = accumulated_step(model, torch.arange(8))
    assert len(reads) == 1, reads
    assert metrics["train/loss"] != 0.0


def _guard_worker(rank, init_file, tmp, results) -> None:
    torch_dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=20),  # a rank left in a barrier fails instead of hanging
    )
    folder = tmp / f"rank{rank}"  # no shared disk: each rank its own checkpoint folder
    folder.mkdir()
    if rank == 0:  # the only rank that writes checkpoints
        (folder / HEALTHY).write_text("weights")
    guard = CollapseGuard({"answer_entropy": {"below": 0.5}}, min_rules=1, dirpath=str(folder))
    guard.watch.healthy_step = 3
    trainer = SimpleNamespace(
        strategy=DDPStrategy(process_group_backend="gloo"),
        is_global_zero=rank == 0,
        should_stop=False,
    )
    guard.raise_alarm(trainer, 7, Verdict(met=[], saturated=True, alarm=True, trends={}))
    # the ranks ran the same collectives: the next one pairs up
    total = dist.all_reduce_sum(torch.tensor([rank + 1.0])).item()
    results[rank] = {
        "files": sorted(p.name for p in folder.iterdir()),
        "sum": total,
        "alarm_step": guard.watch.alarm_step,
    }
    os._exit(0)  # see test_distributed_grads: freeing the gloo group can hang


def test_collapse_guard_ranks_agree_without_a_shared_disk(tmp_path):
    """Only rank 0 sees the kept weights: both ranks still take the same branch (the
    decision is rank 0's), so neither waits in a barrier the other skipped."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_guard_worker, args=(str(tmp_path / "init"), tmp_path, results), nprocs=2)
        results = dict(results)
    assert results[0]["files"] == [PRE_COLLAPSE]
    assert results[1]["files"] == []
    assert [results[rank]["sum"] for rank in (0, 1)] == [3.0, 3.0]
    assert [results[rank]["alarm_step"] for rank in (0, 1)] == [7, 7]
