"""`evaluate(cfg)`: generate on every configured benchmark, grade, score, and write results."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from covo.eval.grading import ChoiceGrader, MathGrader
from covo.eval.metrics import item_metrics, mean_metrics
from covo.eval.results import RESULTS_FILE, markdown_table, write_json, write_scalars
from covo.infra.errors import DataError, SettingError
from covo.infra.hardware import set_threads
from covo.infra.resume import read_policy_state
from covo.launch.settings import check_eval
from covo.models.export import write_folder
from covo.models.loading import LoadedModel
from covo.models.lora import adapter_state, is_lora
from covo.rollout.sampling import eos_token_ids, format_prompts, response_mask_from, sample

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def load_policy_checkpoint(model: torch.nn.Module, ckpt_path: str) -> int:
    """Copy the `policy.*` weights of a Lightning checkpoint (a file, or the folder FSDP2
    writes) into `model`; returns its step.

    Into a LoRA model (`model.lora`, as in training) a LoRA run's checkpoint copies the
    adapters: it holds nothing else, the other weights are the loaded model's."""
    path = Path(ckpt_path).expanduser()
    state, step = read_policy_state(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches, one per line after a header line
        lines = str(err).strip().splitlines()
        raise DataError(f"{path} does not fit the configured model: {lines[-1].strip()}") from None
    if is_lora(model):
        missing = [k for k in missing if k in adapter_state(model, model.state_dict())]
    elif any(".lora_A." in k for k in unexpected):
        raise DataError(f"{path} holds LoRA adapters: set model.lora as in its training run")
    if missing or unexpected:
        raise DataError(
            f"{path} does not fit the configured model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    return step


def resolve_device(name: str) -> str:
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def greedy_responses(
    model, tokenizer, prompts: list[str], chat_template: bool, max_new_tokens: int
) -> tuple[list[str], torch.Tensor]:
    """One greedy response per prompt (the validation pass@1 during training): the decoded
    texts and each response's length in tokens [B]."""
    chat = format_prompts(tokenizer, prompts, chat_template)
    responses = sample(
        model, tokenizer, chat, 1, max_new_tokens, temperature=0.0, with_stats=False
    ).responses
    lengths = response_mask_from(responses, eos_token_ids(model, tokenizer)).sum(1)
    return tokenizer.batch_decode(responses, skip_special_tokens=True), lengths


def sample_responses(
    loaded: LoadedModel, prompts: list[str], cfg: DictConfig, desc: str, engine=None
) -> tuple[list[list[str]], list[list[bool]]]:
    """`num_samples` responses per prompt, in batches of `batch_size` prompts, from `engine`
    (`covo.rollout.sampling.sample`'s default when None).

    Prompts are batched in order of length (less left padding) and returned in input order.
    Returns (texts [B][n], truncated [B][n]: no EOS within `max_new_tokens`).
    """
    model, tokenizer, n = loaded.model, loaded.tokenizer, cfg.num_samples
    eos = eos_token_ids(model, tokenizer)
    device = model.device
    autocast = (
        torch.autocast(device.type, dtype=AUTOCAST_DTYPES[cfg.dtype])
        if cfg.dtype
        else contextlib.nullcontext()
    )
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[list[str]] = [[] for _ in prompts]
    truncated: list[list[bool]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=desc, unit="prompt") as bar, autocast:
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            chat = format_prompts(tokenizer, [prompts[i] for i in batch], loaded.chat_template)
            tokens = sample(
                model,
                tokenizer,
                chat,
                n,
                cfg.max_new_tokens,
                cfg.temperature,
                cfg.top_p,
                engine=engine,
                with_stats=False,
            ).responses
            lengths = response_mask_from(tokens, eos).sum(1).long().tolist()
            for row, (ids, length) in enumerate(zip(tokens.tolist(), lengths)):
                ended = length > 0 and ids[length - 1] in eos
                item = batch[row // n]
                texts[item].append(
                    tokenizer.decode(ids[: length - ended], skip_special_tokens=True)
                )
                truncated[item].append(not ended)
            bar.update(len(batch))
    return texts, truncated


def grade(
    grader: MathGrader | ChoiceGrader,
    items: list[dict],
    texts: list[list[str]],
    truncated: list[list[bool]],
    ks: list[int],
) -> list[dict]:
    """Per-item records: responses, extracted answers, correctness flags and metrics."""
    records = []
    for item, responses, cut in zip(items, texts, truncated):
        answers = [grader.extract(text) for text in responses]
        correct = [grader.is_correct(answer, item["label"]) for answer in answers]
        records.append(
            {
                "problem": item["problem"],
                "label": item["label"],
                "responses": responses,
                "answers": answers,
                "correct": correct,
                "truncated": cut,
                "metrics": item_metrics(answers, correct, ks, grader.same),
            }
        )
    return records


def totals_of(records: list[dict]) -> dict[str, float]:
    """Item count, mean metrics, and the share of responses with an answer / cut off."""
    answers = [a for r in records for a in r["answers"]]
    cut = [t for r in records for t in r["truncated"]]
    return {
        "items": len(records),
        **mean_metrics([r["metrics"] for r in records]),
        "answered": sum(a is not None for a in answers) / len(answers),
        "truncated": sum(cut) / len(cut),
    }


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate the configured model on every benchmark in `cfg.benchmarks`.

    Writes `eval_results.json` and its scalars (TensorBoard, `metrics.jsonl`) under
    `paths.output_dir`, prints the
    Markdown table, and returns the results dict.
    """
    ks = check_eval(cfg)
    if "benchmarks" not in cfg:
        raise SettingError(
            "no benchmark selected: e.g. benchmark=gsm8k or benchmark=[gsm8k,math500]"
        )
    set_threads(cfg.threads)
    benchmarks = {name: hydra.utils.instantiate(node) for name, node in cfg.benchmarks.items()}
    items = {name: b.load(cfg.max_samples) for name, b in benchmarks.items()}
    loaded = hydra.utils.instantiate(cfg.model)
    step = load_policy_checkpoint(loaded.model, cfg.ckpt_path) if cfg.ckpt_path else 0
    if cfg.export_dir:
        write_folder(
            loaded.model, loaded.model.state_dict(), loaded.tokenizer, Path(cfg.export_dir)
        )
        log.info("export_dir: %s", cfg.export_dir)
    loaded.model.to(resolve_device(cfg.device)).eval()

    records, totals = {}, {}
    for name, benchmark in benchmarks.items():
        prompts = [item["prompt"] for item in items[name]]
        # reseeded per benchmark: its samples do not depend on what else runs with it
        torch.manual_seed(cfg.seed)
        texts, truncated = sample_responses(loaded, prompts, cfg, desc=name)
        records[name] = grade(benchmark.grader, items[name], texts, truncated, ks)
        totals[name] = totals_of(records[name])

    out = Path(cfg.paths.output_dir)
    results = {
        "model": loaded.name,
        "ckpt_path": cfg.ckpt_path,
        "step": step,
        "totals": totals,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "records": records,
    }
    write_json(results, out / RESULTS_FILE)
    write_scalars(totals, out, step)
    table = markdown_table(totals)
    print(f"\n{loaded.name} (metrics in %):\n{table}")
    log.info("results: %s", out / RESULTS_FILE)
    return results
