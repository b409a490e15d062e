"""What an exact resume needs beyond Lightning's own state: every random generator of every
rank, and checkpoint files that a kill during a write cannot leave half-written."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from covo.infra import distributed as dist
from covo.infra.errors import DataError


def rng_state() -> dict:
    """Plain values and tensors only, so checkpoints load with `weights_only=True`."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_rng_states() -> list[dict]:
    """Every rank's generator states, in rank order (a collective under DDP/FSDP)."""
    return dist.all_gather_objects(rng_state())


def restore(checkpoint: dict, own_state: dict, world_size: int, rank: int) -> None:
    """Refuse a checkpoint that lacks weights of `own_state` (the module's state dict), and
    set this rank's random generators as they were saved (same world size only). FSDP2's
    checkpoint folder holds no state dict here: the strategy has already loaded the weights,
    and refuses a folder that lacks any."""
    state = checkpoint.get("state_dict")
    missing = [k for k in own_state if state is not None and k not in state]
    if missing:
        raise DataError(
            f"ckpt_path: the checkpoint lacks {len(missing)} of the policy's"
            f" {len(own_state)} weights (first: {missing[0]})"
        )
    states = checkpoint.get("rng_states")
    if states is not None and len(states) == world_size:
        set_rng_state(states[rank])


def seed_rank(seed: int, rank: int) -> None:
    """Seed Python, NumPy and torch for sampling on `rank`: ranks draw different samples.
    Call after the model is built, so initial weights stay identical on every rank."""
    rank_seed = seed * 1000 + rank
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)


class SeedPerRank(Callback):
    """`seed_rank` at the start of fitting: after the strategy has set up the processes (DDP
    and FSDP2 then reseed every rank alike with `seed_everything`'s seed) and before a
    checkpoint's generator states are restored (`restore`), so a resumed run continues each
    rank's own stream."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def setup(self, trainer, pl_module, stage: str) -> None:
        seed_rank(self.seed, trainer.global_rank)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside its target, then renames it: a kill
    during the write leaves the previous file (e.g. `last.ckpt`) whole and loadable."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
