"""Prompts for rollouts: a Lightning data module over lists of `{"problem", "answer"}` items."""

from __future__ import annotations

import logging

import lightning.pytorch as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from covo.data.contamination import check_overlap, shared_problems
from covo.data.sampler import EpochBatches, PositionedItems, ResumableLoader
from covo.infra.checks import INT_GE1, Rule, apply_rules, apply_rules_where_set, at_least
from covo.infra.errors import SettingError

MATH_PROMPT = (
    "Question: {problem}\n"
    "Please reason step by step, and put your final answer within \\boxed{{}}\n"
)


def collate(items: list[dict]) -> dict[str, list]:
    return {key: [item[key] for item in items] for key in items[0]}


log = logging.getLogger(__name__)


DATA_RULES: list[Rule] = [("batch_size", *INT_GE1), ("val_batch_size", *INT_GE1)]
# an option that lists its own `val` items holds none back
VAL_SIZE_RULE: Rule = ("val_size", at_least(0, integer_only=True), "an integer >= 0")


def check_data(data: DictConfig, prefix: str = "data.") -> None:
    """The data group's batching knobs, before any data or model is loaded."""
    apply_rules(data, DATA_RULES, prefix)
    apply_rules_where_set(data, [VAL_SIZE_RULE], prefix)


def check_test_apart(test: list[dict], others: dict[str, list[dict]]) -> None:
    """A test split that shares a problem (as `fingerprint`s: texts evened out) with another
    split is no test split: `SettingError` naming the other."""
    problems = [item["problem"] for item in test]
    for key, items in others.items():
        if shared := shared_problems(problems, [item["problem"] for item in items]):
            raise SettingError(
                f"data.test shares {shared} of its {len(problems)} problems with {key}: "
                "draw it from another part or past that split's problems (data.test.skip)"
            )


class PromptDataModule(L.LightningDataModule):
    """Batches of prompts (the problem put through `prompt_template`) with their answers.

    Answers travel with the batch for the ground-truth reward and diagnostics only. Without
    a `val` list, the last `val_size` items of `train` are held out for validation. A `test`
    list (for the held-out evaluation callback, which reads it from the config) must share no
    problem with `train` or `val`: the run stops here otherwise. The training order depends
    on `seed` alone and resumes exactly from a checkpoint (`covo.data.sampler`); under
    DDP/FSDP each rank takes its own share of every epoch.
    Before fitting, the training problems are checked against every benchmark (the shipped
    ones and those under `benchmark_dir`): any shared item stops the run unless
    `allow_benchmark_overlap`; training items that are also validation problems are counted
    in a warning.
    """

    def __init__(
        self,
        train: list[dict],
        val: list[dict] | None = None,
        test: list[dict] | None = None,
        val_size: int = 0,
        prompt_template: str = MATH_PROMPT,
        batch_size: int = 4,
        val_batch_size: int = 16,
        name: str = "data",
        seed: int = 0,
        allow_benchmark_overlap: bool = False,
        benchmark_dir: str | None = None,
    ):
        super().__init__()
        if "{problem}" not in prompt_template:
            raise SettingError(
                f"data.prompt_template must contain '{{problem}}': {prompt_template!r}"
            )
        if val is None:
            if val_size >= len(train):
                raise SettingError(
                    f"data.val_size={val_size} leaves no training items ({len(train)})"
                )
            train, val = (train[:-val_size], train[-val_size:]) if val_size else (train, [])
        if test:
            check_test_apart(test, {"data.train": train, "data.val": val})
        self.name = name
        self.allow_benchmark_overlap = allow_benchmark_overlap
        self.benchmark_dir = benchmark_dir
        self.prompt_template = prompt_template
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.seed = seed
        self.train_sampler: EpochBatches | None = None
        self.train_items = [self.with_prompt(item) for item in train]
        self.val_items = [self.with_prompt(item) for item in val]

    def with_prompt(self, item: dict) -> dict:
        return {**item, "prompt": self.prompt_template.format(problem=item["problem"])}

    def setup(self, stage: str) -> None:
        if stage == "fit":
            problems = [item["problem"] for item in self.train_items]
            check_overlap(problems, self.benchmark_dir, self.allow_benchmark_overlap)
            held_out = [item["problem"] for item in self.val_items]
            if shared := shared_problems(problems, held_out):
                log.warning(
                    "%d of the %d training items are also validation problems: val/accuracy "
                    "is then not held out",
                    shared,
                    len(problems),
                )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        self.train_sampler = EpochBatches(
            len(self.train_items), self.batch_size, self.seed, rank, world
        )
        if len(self.train_sampler) == 0:
            raise SettingError(
                f"data.batch_size={self.batch_size} exceeds the {len(self.train_items)} training"
                f" items per process ({world} processes)"
            )
        return ResumableLoader(
            PositionedItems(self.train_items),
            batch_sampler=self.train_sampler,
            collate_fn=collate,
            # the iterator's base seed comes from here, not from the global generator, so
            # starting an iterator on resume draws nothing the uninterrupted run did not
            generator=torch.Generator().manual_seed(self.seed),
        )

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        positions = batch.pop("position", None)
        if positions is not None and self.train_sampler is not None:
            self.train_sampler.mark_consumed(positions[0])
        return batch

    def val_dataloader(self) -> DataLoader:
        """This rank's share of the validation problems (every world-th from its rank on)."""
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        if 0 < len(self.val_items) < world:
            raise SettingError(
                f"data.val: {len(self.val_items)} validation problems for {world} processes"
                " (at least one each)"
            )
        share = self.val_items[rank::world]
        return DataLoader(share, batch_size=self.val_batch_size, collate_fn=collate)
