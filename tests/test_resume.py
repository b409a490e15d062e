"""Exact resume: the training order, every generator, atomic checkpoint files, kill -9."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_RUN
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from covo.data.sampler import EpochBatches
from covo.infra.resume import AtomicCheckpointIO, rng_state, seed_rank, set_rng_state
from covo.launch.train import build


def batches(sampler, n):
    out = []
    for _ in range(n):
        for batch in sampler:
            out.append([i for _, _, i in batch])
            sampler.mark_consumed(batch[0][:2])
            if len(out) == n:
                return out
    return out


def test_sampler_resumes_at_the_next_unconsumed_batch_across_epochs():
    straight = batches(EpochBatches(10, 3, seed=5), 7)  # 3 batches an epoch
    assert len({tuple(b) for b in straight[:3]} | {tuple(b) for b in straight[3:6]}) == 6
    assert straight[:3] != straight[3:6]  # each epoch its own order
    first = EpochBatches(10, 3, seed=5)
    assert batches(first, 4) == straight[:4]
    state = first.state_dict()
    assert state == {"epoch": 1, "batch": 1}
    resumed = EpochBatches(10, 3, seed=5)
    resumed.load_state_dict(state)
    assert batches(resumed, 3) == straight[4:7]


def test_ranks_take_disjoint_shares_of_each_epoch():
    shares = [EpochBatches(9, 2, seed=1, rank=r, world=2) for r in (0, 1)]
    assert [len(s) for s in shares] == [2, 2]  # 4 items each, the odd one dropped
    got = [sum(batches(s, 2), []) for s in shares]
    assert not set(got[0]) & set(got[1])
    assert len(set(got[0]) | set(got[1])) == 8


def test_rank_seeds_differ_and_generator_states_round_trip():
    seed_rank(3, 0)
    a = torch.rand(4)
    seed_rank(3, 1)
    b = torch.rand(4)
    assert not torch.equal(a, b)
    state = rng_state()
    import random

    import numpy as np

    expected = (torch.rand(3), np.random.rand(2), random.random())
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(expected[0], again[0])
    assert (expected[1] == again[1]).all() and expected[2] == again[2]


SLOW_WRITER = """
import sys, time, torch
from covo.infra.resume import AtomicCheckpointIO

real_save = torch.save

def slow_save(obj, f):
    f.write(b"partial" * 1000)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
    real_save(obj, f)

torch.save = slow_save
AtomicCheckpointIO().save_checkpoint({"step": 2}, sys.argv[1])
"""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_file_loadable(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.arange(3)}, target)
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(target)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"  # the new file is half written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    loaded = torch.load(target, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".last.ckpt.tmp")]


def test_a_checkpoint_without_policy_weights_is_refused(tiny_cfg, tmp_path):
    cfg = tiny_cfg("callbacks=none", "logger=none", "export_dir=null", "trainer.max_steps=1")
    module, datamodule, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    ckpt = tmp_path / "weights.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if "layers.1." not in k}
    torch.save(state, ckpt)
    cfg = tiny_cfg("callbacks=none", "logger=none", "export_dir=null", "trainer.max_steps=2")
    module, datamodule, trainer = build(cfg)
    with pytest.raises(ValueError, match=r"lacks 9 of the policy's 21 weights"):
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt))


RUN = [
    *TINY_RUN,
    "reward=self_certainty",
    "trainer.max_steps=6",
    "optimizer.lr=1e-3",  # steps that move weights far beyond the 1e-6 tolerance
    "trainer.precision=32-true",
    "threads=1",
    "val_every_n_rollouts=100",
    "module.samples_every_n_steps=1",
    "callbacks.model_checkpoint.every_n_steps=1",
]


def train_cmd(log_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "train.py", *RUN, f"paths.log_dir={log_dir}", *overrides]


def run_dir(log_dir: Path) -> Path:
    (run,) = (log_dir / "train" / "runs").iterdir()
    return run


def samples_by_step(run: Path) -> dict[int, bytes]:
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    return {e.step: e.tensor_proto.string_val[0] for e in events.Tensors("samples/text_summary")}


def test_kill_9_and_resume_reproduce_the_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(train_cmd(straight), cwd=ROOT, check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        train_cmd(killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ckpts = list(killed.glob("train/runs/*/checkpoints/step_000003.ckpt"))
        if ckpts:
            proc.send_signal(signal.SIGKILL)  # wherever the run is: mid-step, mid-write
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    last = run_dir(killed) / "checkpoints" / "last.ckpt"
    resumed_from = torch.load(last, weights_only=True)["global_step"]
    assert 2 <= resumed_from < 6  # last.ckpt is written after step_000003.ckpt

    resumed = tmp_path / "resumed"
    subprocess.run(
        train_cmd(resumed, f"ckpt_path={last}"),
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    straight_run, resumed_run = run_dir(straight), run_dir(resumed)
    # the same rollouts (the sampled texts of every step after the resume) ...
    expected, got = samples_by_step(straight_run), samples_by_step(resumed_run)
    assert sorted(got) == list(range(resumed_from, 6))
    for step in got:
        assert got[step] == expected[step], step
    # ... and the same final weights
    a = load_file(straight_run / "hf_model" / "model.safetensors")
    b = load_file(resumed_run / "hf_model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    # steps after the kill did move the weights: equality is not the checkpoint's own
    mid = torch.load(straight_run / "checkpoints" / "step_000003.ckpt", weights_only=True)
    name = "model.layers.0.mlp.up_proj.weight"
    assert (mid["state_dict"][f"policy.{name}"] - b[name]).abs().max() > 1e-4
