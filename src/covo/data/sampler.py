"""A training order that a killed run resumes exactly: batches are a function of (seed, epoch,
batch index), and the loader's state is the position of the next batch a training step takes.

Lightning fetches a batch ahead of the step that uses it, so what an iterator has yielded is
not what training consumed: each batch carries its position, and the data module records it
when the batch reaches the step (`mark_consumed`). The loader's `state_dict` then reports the
next unconsumed batch, and Lightning hands it back through `load_state_dict` before the
resumed run iterates.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

Position = tuple[int, int]  # (epoch, batch index within the epoch)


class EpochBatches(Sampler[list[tuple[int, int, int]]]):
    """Batches of `batch_size` indices into a dataset of `size` items, this rank's share.

    Epoch e shuffles with a generator seeded from (seed, e) and deals items round-robin over
    `world` ranks (the remainder is dropped, as is an incomplete last batch). Each yielded
    entry is (epoch, batch index, item index).
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0
        self.consumed: Position | None = None

    def __len__(self) -> int:
        return (self.size // self.world) // self.batch_size

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        return order[self.rank : (self.size // self.world) * self.world : self.world]

    def __iter__(self):
        epoch, share = self.epoch, self.order(self.epoch)
        start, self.start = self.start, 0
        self.epoch += 1  # the next iteration is the next epoch
        for b in range(start, len(self)):
            yield [(epoch, b, i) for i in share[b * self.batch_size : (b + 1) * self.batch_size]]

    def mark_consumed(self, position: Position) -> None:
        self.consumed = position

    def state_dict(self) -> dict:
        if self.consumed is None:
            return {"epoch": self.epoch, "batch": self.start}
        epoch, batch = self.consumed
        if batch + 1 >= len(self):
            return {"epoch": epoch + 1, "batch": 0}
        return {"epoch": epoch, "batch": batch + 1}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.start = int(state["epoch"]), int(state["batch"])
        self.consumed = None


class PositionedItems(Dataset):
    """Items looked up by (epoch, batch, index); each comes back with its batch position."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        epoch, batch, index = key
        return {**self.items[index], "position": (epoch, batch)}


class ResumableLoader(DataLoader):
    """A DataLoader whose state (Lightning saves and restores it) is its sampler's."""

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)
