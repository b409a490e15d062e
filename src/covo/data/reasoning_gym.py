"""Procedural problems from reasoning-gym (the `gym` extra): training data no benchmark holds.

Each task is one of reasoning-gym's seeded generators; its items come with their answers
(for diagnostics and the ground-truth reward only). `gsm_symbolic` varies the names and numbers
of GSM8K test questions (GSM-Symbolic's templates): it is GSM8K's problems in other words, so it
is left out of the default tasks and warned about when chosen.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping

from covo.data.datamodule import PromptDataModule
from covo.models.lora import MissingExtraError

log = logging.getLogger(__name__)
GSM8K_TEMPLATES = {"gsm_symbolic"}


def _reasoning_gym():
    try:
        import reasoning_gym
    except ModuleNotFoundError:
        raise MissingExtraError(
            "data=reasoning_gym needs the gym extra: pip install -e '.[gym]'"
        ) from None
    return reasoning_gym


def _task_items(task: str, size: int, seed: int, config: Mapping) -> list[dict]:
    rg = _reasoning_gym()
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise ValueError(f"unknown reasoning-gym task {task!r}; valid: {', '.join(DATASETS)}")
    try:
        dataset = rg.create_dataset(task, size=size, seed=seed, **dict(config))
    except (TypeError, AssertionError) as err:
        raise ValueError(f"data.task_config.{task}: {err}") from None
    return [{"problem": item["question"], "answer": str(item["answer"])} for item in dataset]


def generate(
    tasks: list[str],
    size: int,
    seed: int = 0,
    split: str = "train",
    task_config: Mapping[str, Mapping] | None = None,
) -> list[dict]:
    """`size` items `{"problem", "answer"}` shared out over `tasks` (the first tasks get one
    more when `size` does not divide), task by task. Each task's generator is seeded from
    (`seed`, `split`, task): the same arguments give the same list.
    `task_config[task]`: keyword arguments of that task's reasoning-gym config.
    """
    if not tasks:
        raise ValueError("data.tasks is empty: name at least one reasoning-gym task")
    if size < len(tasks):
        key = "data.size" if split == "train" else f"data.{split}_size"
        raise ValueError(f"{key}={size} leaves some of the {len(tasks)} tasks without items")
    chosen = sorted(GSM8K_TEMPLATES & set(tasks))
    if chosen and split == "train":
        log.warning("%s rewrites GSM8K test questions: do not compare on GSM8K", chosen[0])
    task_config = task_config or {}
    share, extra = divmod(size, len(tasks))
    items = []
    for j, task in enumerate(tasks):
        task_seed = zlib.crc32(f"{seed}/{split}/{task}".encode())
        items += _task_items(task, share + (j < extra), task_seed, task_config.get(task, {}))
    return items


def datamodule(
    tasks: list[str],
    size: int = 2000,
    val_size: int = 16,
    seed: int = 0,
    task_config: Mapping[str, Mapping] | None = None,
    **kwargs,
) -> PromptDataModule:
    """A prompt data module over `size` training and `val_size` validation items of `tasks`
    (validation items whose problem is also a training problem are dropped); `kwargs` go to
    `PromptDataModule`."""
    tasks = list(tasks)
    train = generate(tasks, size, seed, "train", task_config)
    seen = {item["problem"] for item in train}
    val = generate(tasks, val_size, seed, "val", task_config)
    val = [item for item in val if item["problem"] not in seen]
    return PromptDataModule(train=train, val=val, name="reasoning_gym", seed=seed, **kwargs)
