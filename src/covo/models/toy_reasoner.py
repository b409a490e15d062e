"""The toy labs: small Llamas pretrained here on step-by-step arithmetic, shipped.

`load` is the loader of `model=toy_reasoner` and of every other lab (`model=toy_calibrated`).
`python -m covo.models.toy_reasoner --out DIR [--slip-rate 0.15 --max-operands 4 ...]`
pretrains a lab from scratch on the `pretrain` part of the toy problems (prompts put through
`conf/data/toy_arithmetic.yaml`'s `prompt_template` and the chat template, as RL will see them),
with a share of slipped steps so that RL has headroom. Every property that decides a
label-free reward's signal is a flag (`Lab`), recorded in the folder's `pretraining.json`; each
shipped lab came from its command (docs/toy_reasoner.md). Pretraining is deterministic on one
thread: same flags, same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tokenizers import pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from covo.data.arithmetic import OPERATORS, generate, worked_solution
from covo.eval.grading import MathGrader
from covo.eval.harness import grade, sample_responses, totals_of
from covo.infra.configs import conf_dir
from covo.models.loading import LoadedModel, chatml_bpe_tokenizer, load_hf
from covo.rollout.sampling import format_prompts

WEIGHTS = Path(__file__).resolve().parent / "weights"
PACKAGED = WEIGHTS / "toy_reasoner"
DATA_CONF = conf_dir() / "data" / "toy_arithmetic.yaml"
PARTS = {"pretrain": 8, "train": 1, "val": 1}  # as conf/data/toy_*.yaml split the problems
SCHEDULES = ("constant", "cosine")


class LabError(ValueError):
    """A pretraining flag out of its range; the message names the flag."""


@dataclass(frozen=True)
class Lab:
    """What decides a lab's behaviour, and so a label-free reward's signal on it; written
    into `pretraining.json` beside the weights. The defaults are the shipped toy reasoner's.

    Problems: `min_operands`..`max_operands` one-digit-to-`max_value` operands joined by
    `operators`, from the `pretrain` part. Slips: each step of a worked solution is off with
    probability `slip_rate` by 1..`slip_scatter` either way, and later steps carry it on, so
    wrong answers scatter over 2 * `slip_scatter` values per slipped step. Model: a Llama of
    `num_layers` x `hidden_size`. Optimisation: `steps` AdamW steps of `batch_size`, lr `lr`
    after `warmup` steps, then `constant` or `cosine` down to lr / 10.
    """

    seed: int = 0
    steps: int = 500
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50
    schedule: str = "constant"
    slip_rate: float = 0.15
    slip_scatter: int = 3
    min_operands: int = 3
    max_operands: int = 4
    max_value: int = 9
    operators: str = "+-"
    hidden_size: int = 128
    num_layers: int = 4
    vocab_size: int = 384

    def __post_init__(self):
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                value = getattr(self, name)
                raise LabError(f"--{name.replace('_', '-')} must be {what}, got {value!r}")

        for name in ("steps", "batch_size", "slip_scatter", "num_layers", "vocab_size"):
            need(getattr(self, name) >= 1, name, "an integer >= 1")
        need(self.warmup >= 0, "warmup", "an integer >= 0")
        need(self.lr > 0, "lr", "> 0")
        need(self.schedule in SCHEDULES, "schedule", " or ".join(SCHEDULES))
        need(0 <= self.slip_rate < 1, "slip_rate", "in [0, 1)")
        need(self.min_operands >= 2, "min_operands", "an integer >= 2")
        need(self.min_operands <= self.max_operands, "max_operands", ">= --min-operands")
        need(self.max_value >= 1, "max_value", "an integer >= 1")
        need(
            bool(self.operators) and set(self.operators) <= set(OPERATORS),
            "operators",
            f"some of {''.join(OPERATORS)}",
        )
        need(self.hidden_size >= 4 and self.hidden_size % 4 == 0, "hidden_size", "a multiple of 4")

    def problems(self) -> dict:
        """The problem generator's settings (`covo.data.arithmetic.generate`) of the corpus."""
        return {
            "min_operands": self.min_operands,
            "max_operands": self.max_operands,
            "max_value": self.max_value,
            "operators": list(self.operators),
            "parts": PARTS,
        }

    def lr_factor(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        if self.schedule == "constant" or step < self.warmup:
            return warm
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def folder(weights: str | None = None, lab: str = "toy_reasoner") -> Path:
    """The folder `load` reads: `weights`, else the packaged lab `lab`."""
    return Path(weights) if weights else WEIGHTS / lab


def load(weights: str | None = None, lab: str = "toy_reasoner", **options) -> LoadedModel:
    """The packaged lab `lab` (or the folder `weights`); `options` as `load_hf`'s."""
    loaded = load_hf(str(folder(weights, lab)), **options)
    loaded.name = lab
    return loaded


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts` with every digit its own token, ChatML template."""
    digits_then_bytes = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(False)]
    )
    return chatml_bpe_tokenizer(
        texts, vocab_size, digits_then_bytes, clean_up_tokenization_spaces=False
    )


def prompt_template() -> str:
    """The prompt template of the toy data configs (`conf/data/toy_arithmetic.yaml`)."""
    return OmegaConf.load(DATA_CONF).prompt_template


def corpus(lab: Lab, num: int) -> list[tuple[str, str]]:
    """`num` (prompt, worked solution) pairs from the pretraining part; solutions slip as
    `worked_solution` says."""
    template = prompt_template()
    rng = random.Random(f"{lab.seed}/slips")
    pairs = []
    problems = generate(num, lab.seed, split="pretrain", distinct=False, **lab.problems())
    for item in problems:
        expression = item["problem"].removeprefix("Compute ").removesuffix(".")
        solution, _ = worked_solution(expression, rng, lab.slip_rate, lab.slip_scatter)
        pairs.append((template.format(problem=item["problem"]), solution))
    return pairs


def encode(
    tokenizer: PreTrainedTokenizerFast, pairs: list[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-formatted prompt + solution + EOS, right-padded; labels -100 on prompt and padding."""
    prompts = format_prompts(tokenizer, [p for p, _ in pairs], chat_template=True)
    rows = []
    for prompt, (_, solution) in zip(prompts, pairs):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        s = tokenizer(solution + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append((p + s, [-100] * len(p) + s))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    return ids, labels


def pretrain(
    lab: Lab, log_every: int = 100, save_every: int = 0, out: Path | None = None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict]:
    """Train from scratch: `lab.steps` AdamW steps over fresh batches of the corpus. Returns
    model, tokenizer and a record of the run (the lab's settings, loss, time). With
    `save_every`, the weights of every such step go to `out`/step_N too (what a shorter run
    would give when the schedule is constant after the warm-up)."""
    torch.manual_seed(lab.seed)
    pairs = corpus(lab, lab.steps * lab.batch_size)
    tokenizer = build_tokenizer([p + s for p, s in pairs[:2000]], lab.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=lab.hidden_size,
        intermediate_size=4 * lab.hidden_size,
        num_hidden_layers=lab.num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lab.lr, betas=(0.9, 0.98), weight_decay=0.0
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lab.lr_factor)
    start, cpu_start, losses = time.perf_counter(), time.process_time(), []
    model.train()
    for step in range(lab.steps):
        batch = pairs[step * lab.batch_size : (step + 1) * lab.batch_size]
        ids, labels = encode(tokenizer, batch)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(
                f"step {step + 1}/{lab.steps} loss {recent:.4f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
        if save_every and (step + 1) % save_every == 0:
            model.save_pretrained(out / f"step_{step + 1}")
            tokenizer.save_pretrained(out / f"step_{step + 1}")
    record = {
        **asdict(lab),
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
    }
    model.eval()
    return model, tokenizer, record


def heldout(
    loaded: LoadedModel,
    items: list[dict],
    num_samples: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """Greedy accuracy, and at `temperature` the mean accuracy of `num_samples` samples and
    pass@`num_samples`, over `items` (`prompt` and `answer` each, as the data module gives).

    Both go through the evaluation harness (`covo.eval.harness`); the answer is the last
    `\\boxed{}`, as the model is pretrained to write it.
    """
    grader = MathGrader("boxed")
    labelled = [{"problem": item["problem"], "label": item["answer"]} for item in items]
    prompts = [item["prompt"] for item in items]
    metrics = {}
    for name, n, t in (("greedy", 1, 0.0), ("sampled", num_samples, temperature)):
        cfg = OmegaConf.create(
            {
                "num_samples": n,
                "temperature": t,
                "top_p": 1.0,
                "max_new_tokens": max_new_tokens,
                "batch_size": len(items),
                "dtype": None,
            }
        )
        torch.manual_seed(seed)
        texts, truncated = sample_responses(loaded, prompts, cfg, desc=name)
        totals = totals_of(grade(grader, labelled, texts, truncated, [1, n]))
        metrics[name] = totals["pass@1"]
        if name == "sampled":
            metrics[f"pass@{n}"] = totals[f"pass@{n}"]
    return metrics


def parse_lab(argv: list[str] | None = None) -> tuple[Lab, argparse.Namespace]:
    """The lab of the command line (every field of `Lab` is a flag) and the other flags."""
    parser = argparse.ArgumentParser(description="Pretrain a toy lab (one thread).")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write")
    parser.add_argument("--save-every", type=int, default=0, help="also keep every N steps")
    for field in fields(Lab):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    lab = Lab(**{f.name: getattr(args, f.name) for f in fields(Lab)})
    return lab, args


def main(argv: list[str] | None = None) -> None:
    try:
        lab, args = parse_lab(argv)
    except LabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(1)
    model, tokenizer, record = pretrain(lab, save_every=args.save_every, out=args.out)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "pretraining.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
