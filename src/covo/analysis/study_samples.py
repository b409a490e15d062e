"""The study's samples: N responses per problem, drawn once and kept as a score-input jsonl.

Each line is `{"prompt": problem, "answer": label, "responses": [text, ...], "response_ids":
[[id, ...], ...], "truncated": [bool, ...]}`: what `python -m covo.score` reads (the problem goes
through the prompt template at scoring time), plus the generated token ids, so scoring sees
exactly the tokens the policy sampled. Lines are appended batch by batch to `<file>.partial`; an
interrupted run continues where it stopped (every batch is seeded by its first problem's index,
so the samples do not depend on where a run was interrupted), and the file gets its final name
when every problem has its samples. A side file `<file>.json` records what drew them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from covo.analysis.score import read_records
from covo.data.jsonl import DataError
from covo.models import toy_reasoner
from covo.models.loading import LoadedModel
from covo.rollout.sampling import eos_token_ids, format_prompts, response_mask_from, sample
from covo.rollout.views import view_prompts

log = logging.getLogger(__name__)


def weight_files(model: dict) -> dict[str, list[int]]:
    """Size and modification time of the weight files of a model config's local folder (a
    toy lab's, `weights`, a local `name_or_path`): weights written anew into the same folder
    are other weights, whose samples are not the cached ones."""
    if "lab" in model:
        folder = toy_reasoner.folder(model.get("weights"), model["lab"])
    elif model.get("name_or_path"):
        folder = Path(model["name_or_path"])
    else:
        return {}
    if not folder.is_dir():  # a hub name, not a folder
        return {}
    return {
        f.name: [f.stat().st_size, f.stat().st_mtime_ns]
        for f in sorted(folder.glob("*.safetensors"))
    }


def sampling_key(cfg: DictConfig, view: str | None = None) -> dict:
    """Everything that decides the samples: the model's weights, prompts and sampling; not
    where the model is cached, nor knobs that only training reads (adapters start as the
    identity). `view`: the template of a reward's view the prompts are put through."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    for training_only in ("cache_dir", "dtype", "gradient_checkpointing", "lora"):
        model.pop(training_only, None)
    # the study samples with the weights as loaded: in their master dtype
    model["dtype"] = model.pop("master_dtype", "float32")
    model["files"] = weight_files(model)
    return {
        "model": model,
        "problems": OmegaConf.to_container(cfg.problems, resolve=True),
        "prompt_template": cfg.prompt_template,
        "sampling": OmegaConf.to_container(cfg.sampling, resolve=True),
        "seed": cfg.seed,
        **({"view": view} if view else {}),
    }


def samples_path(cfg: DictConfig, view: str | None = None) -> Path:
    """`cfg.samples` (a view's samples beside it), or a file in the cache named by a hash of
    `sampling_key(cfg, view)`."""
    if cfg.samples:
        path = Path(cfg.samples).expanduser()
        if view:
            digest = hashlib.sha256(view.encode()).hexdigest()[:16]
            return path.with_name(f"{path.stem}.view-{digest}{path.suffix}")
        return path
    key = sampling_key(cfg, view)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Path(cfg.paths.cache_dir).expanduser() / "study" / f"samples-{digest[:16]}.jsonl"


def read_samples(path: Path, items: list[dict]) -> list[dict]:
    """The records of `path`; they must answer `items` in order (a prefix of them for a
    `.partial` file)."""
    records = list(read_records(path))
    complete = not path.name.endswith(".partial")
    if len(records) > len(items) or (complete and len(records) != len(items)):
        raise DataError(f"{path}: {len(records)} sampled problems, the study has {len(items)}")
    for n, (record, item) in enumerate(zip(records, items), start=1):
        if record["prompt"] != item["problem"]:
            raise DataError(f"{path}:{n}: sampled for another problem: {record['prompt']!r}")
    return records


def cut_responses(tokens: torch.Tensor, eos: set[int]) -> list[tuple[list[int], bool]]:
    """(ids up to the first EOS, truncated: no EOS) per generated row [R, G]."""
    lengths = response_mask_from(tokens, eos).sum(1).long().tolist()
    rows = []
    for ids, length in zip(tokens.tolist(), lengths):
        ended = length > 0 and ids[length - 1] in eos
        rows.append((ids[: length - ended], not ended))
    return rows


def draw(
    loaded: LoadedModel, items: list[dict], cfg: DictConfig, start: int, view: str | None = None
) -> Iterator[list[dict]]:
    """Sample `cfg.sampling.num_samples` responses per item from `items[start:]`, one batch of
    `cfg.sampling.batch_size` problems per generate call, the prompts put through the view
    template `view` if given (with a sampling seed of its own); yields each batch's records."""
    model, tokenizer, s = loaded.model, loaded.tokenizer, cfg.sampling
    eos = eos_token_ids(model, tokenizer)
    for first in range(start, len(items), s.batch_size):
        batch = items[first : first + s.batch_size]
        torch.manual_seed(cfg.seed * 1_000_003 + first + (zlib.crc32(view.encode()) if view else 0))
        prompts = [cfg.prompt_template.format(problem=item["problem"]) for item in batch]
        prompts = view_prompts(prompts, view) if view else prompts
        chat = format_prompts(tokenizer, prompts, loaded.chat_template)
        responses = sample(
            model,
            tokenizer,
            chat,
            s.num_samples,
            s.max_new_tokens,
            s.temperature,
            s.top_p,
            with_stats=False,
        ).responses
        rows = cut_responses(responses, eos)
        records = []
        for b, item in enumerate(batch):
            mine = rows[b * s.num_samples : (b + 1) * s.num_samples]
            records.append(
                {
                    "prompt": item["problem"],
                    "answer": item.get("answer"),
                    "responses": [tokenizer.decode(i, skip_special_tokens=True) for i, _ in mine],
                    "response_ids": [ids for ids, _ in mine],
                    "truncated": [cut for _, cut in mine],
                }
            )
        yield records


def load_or_sample(
    loaded: LoadedModel, items: list[dict], cfg: DictConfig, view: str | None = None
) -> tuple[Path, dict]:
    """The samples file of this study (drawn now where missing) and its side record; with
    `view`, of the prompts put through that view template (for a reward that compares views).

    The side record holds the sampling key, the problems done and the sampling seconds
    summed over the runs that drew them.
    """
    path = samples_path(cfg, view)
    partial = path.with_name(path.name + ".partial")
    side_path = path.with_name(path.name + ".json")
    if path.exists():
        read_samples(path, items)
        return path, json.loads(side_path.read_text()) if side_path.exists() else {}
    done = read_samples(partial, items) if partial.exists() else []
    side = json.loads(side_path.read_text()) if done and side_path.exists() else {}
    side.update(key=sampling_key(cfg, view), problems=len(done), seconds=side.get("seconds", 0.0))
    log.info("Sampling %d problems into %s (%d already there)", len(items), path, len(done))
    partial.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with partial.open("a", encoding="utf-8") as out:
        for records in draw(loaded, items, cfg, len(done), view):
            out.write("".join(json.dumps(r) + "\n" for r in records))  # ASCII: one line each
            out.flush()
            side["problems"] += len(records)
            side["seconds"] += time.perf_counter() - started
            started = time.perf_counter()
            side_path.write_text(json.dumps(side, indent=1))
    partial.rename(path)
    return path, side
