"""What an exact resume needs beyond Lightning's own state: every random generator of every
rank, and checkpoints (files, or FSDP2's folders) that a kill during a write cannot leave
half-written; and the policy's weights read back from either layout."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from covo.infra import distributed as dist
from covo.infra.errors import DataError

POLICY_PREFIX = "policy."
FOLDER_METADATA = "meta.pt"  # Lightning's: the trainer state beside a folder's shards


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


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_checkpoint(written: Path, path: Path) -> None:
    """Put the finished checkpoint `written` (a file or a folder) at `path`. A folder cannot
    replace a folder in one rename: the previous one is first set aside beside it and removed
    once the new one is in place, so whenever a kill strikes, `path` or its `.old` is whole."""
    old = path.with_name(f".{path.name}.old")
    remove_path(old)
    if path.exists() or path.is_symlink():
        os.replace(path, old)
    os.replace(written, path)
    remove_path(old)


def recover_checkpoint(path: Path) -> Path:
    """`path` again when a kill struck between `replace_checkpoint`'s two renames (the previous
    checkpoint set aside as `.<name>.old`, the new one not yet in place); returns `path`."""
    old = path.with_name(f".{path.name}.old")
    if not (path.exists() or path.is_symlink()) and old.exists():
        os.replace(old, path)
    return path


def partial_path(path: Path) -> Path:
    """Where a checkpoint is written before it replaces `path` (one name for every rank)."""
    return path.with_name(f".{path.name}.partial")


def read_policy_state(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """The policy's weights (names without `policy.`) and the optimizer step of a Lightning
    checkpoint: a file, or the folder FSDP2 writes (torch.distributed.checkpoint shards and
    `meta.pt`), read whole in this one process without the optimizer state."""
    if not recover_checkpoint(path).exists():
        raise DataError(f"checkpoint not found: {path}")
    if not path.is_dir():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = ckpt.get("state_dict", {})
        step = ckpt.get("global_step", 0)
    else:
        state = read_folder_weights(path, f"state_dict.{POLICY_PREFIX}")
        state = {key.removeprefix("state_dict."): value for key, value in state.items()}
        meta = path / FOLDER_METADATA
        step = torch.load(meta, weights_only=True).get("global_step", 0) if meta.is_file() else 0
    policy = {
        key.removeprefix(POLICY_PREFIX): value
        for key, value in state.items()
        if key.startswith(POLICY_PREFIX)
    }
    if not policy:
        raise DataError(f"{path}: no '{POLICY_PREFIX}*' weights in its state_dict")
    return policy, int(step)


def read_folder_weights(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a torch.distributed.checkpoint folder whose names start with `prefix`."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(path)
    try:
        metadata = reader.read_metadata()
    except FileNotFoundError:
        raise DataError(f"{path}: a folder, but no torch.distributed.checkpoint in it") from None
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if state:
        load(state, storage_reader=reader, no_dist=True)
    return state
