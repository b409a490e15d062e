"""The toy reasoner: a small Llama pretrained here on step-by-step arithmetic, shipped.

`load` is `model=toy_reasoner`'s loader. `python -m covo.models.toy_reasoner --seed 0 --out DIR`
pretrains it from scratch on the `pretrain` part of `conf/data/toy_arithmetic.yaml` (prompts
put through that config's `prompt_template` and the chat template, as RL will see them), with a
share of slipped steps so that RL has headroom; the shipped weights came from that command
(docs/toy_reasoner.md). Pretraining is deterministic on one thread: same seed, same weights.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tokenizers import pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from covo.data.arithmetic import generate, worked_solution
from covo.eval.grading import MathGrader
from covo.eval.harness import grade, sample_responses, totals_of
from covo.models.loading import LoadedModel, chatml_bpe_tokenizer, load_hf
from covo.rollout.sampling import format_prompts

PACKAGED = Path(__file__).resolve().parent / "weights" / "toy_reasoner"
DATA_CONF = Path(__file__).resolve().parents[3] / "conf" / "data" / "toy_arithmetic.yaml"


def load(weights: str | None = None, **options) -> LoadedModel:
    """The packaged toy reasoner (or the folder `weights`); `options` as `load_hf`'s."""
    loaded = load_hf(str(weights or PACKAGED), **options)
    loaded.name = "toy_reasoner"
    return loaded


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts` with every digit its own token, ChatML template."""
    digits_then_bytes = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(False)]
    )
    return chatml_bpe_tokenizer(
        texts, vocab_size, digits_then_bytes, clean_up_tokenization_spaces=False
    )


def data_settings() -> tuple[dict, str]:
    """The problem generator's settings (without size, seed, split) and the prompt template of
    `conf/data/toy_arithmetic.yaml`, the RL data the model is pretrained for."""
    conf = OmegaConf.load(DATA_CONF)
    train = OmegaConf.to_container(conf.train)
    settings = {k: v for k, v in train.items() if k not in ("_target_", "num_problems", "seed")}
    settings.update(split="pretrain", distinct=False)
    return settings, conf.prompt_template


def corpus(num: int, seed: int, slip_rate: float) -> list[tuple[str, str]]:
    """`num` (prompt, worked solution) pairs from the pretraining part; solutions slip as
    `worked_solution` says."""
    settings, template = data_settings()
    rng = random.Random(f"{seed}/slips")
    pairs = []
    for item in generate(num, seed, **settings):
        expression = item["problem"].removeprefix("Compute ").removesuffix(".")
        solution, _ = worked_solution(expression, rng, slip_rate)
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
    seed: int = 0,
    steps: int = 500,
    batch_size: int = 64,
    lr: float = 3e-3,
    warmup: int = 50,
    slip_rate: float = 0.15,
    hidden_size: int = 128,
    num_layers: int = 4,
    vocab_size: int = 384,
    log_every: int = 100,
    save_every: int = 0,
    out: Path | None = None,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict]:
    """Train from scratch: `steps` AdamW steps (linear warm-up, then constant lr) over fresh
    batches of the corpus. Returns model, tokenizer and a record of the run. With `save_every`,
    the weights of every such step go to `out`/step_N too (what a shorter run would give, the
    lr being constant after the warm-up)."""
    torch.manual_seed(seed)
    pairs = corpus(steps * batch_size, seed, slip_rate)
    tokenizer = build_tokenizer([p + s for p, s in pairs[:2000]], vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    start, cpu_start, losses = time.perf_counter(), time.process_time(), []
    model.train()
    for step in range(steps):
        ids, labels = encode(tokenizer, pairs[step * batch_size : (step + 1) * batch_size])
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
                f"step {step + 1}/{steps} loss {recent:.4f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
        if save_every and (step + 1) % save_every == 0:
            model.save_pretrained(out / f"step_{step + 1}")
            tokenizer.save_pretrained(out / f"step_{step + 1}")
    record = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "slip_rate": slip_rate,
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain the toy reasoner (one thread).")
    defaults = inspect.signature(pretrain).parameters
    parser.add_argument("--seed", type=int, default=defaults["seed"].default)
    parser.add_argument("--out", type=Path, required=True, help="the folder to write")
    parser.add_argument("--steps", type=int, default=defaults["steps"].default)
    parser.add_argument("--slip-rate", type=float, default=defaults["slip_rate"].default)
    parser.add_argument("--save-every", type=int, default=0, help="also keep every N steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer, record = pretrain(
        args.seed, args.steps, slip_rate=args.slip_rate, save_every=args.save_every, out=args.out
    )
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "pretraining.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
