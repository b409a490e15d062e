"""What decoding costs beyond the model's own forward, and what pays on this device.

SmolLM2-135M-Instruct (or --model qwen_coder_05b), R rows = prompts x samples, exactly
--tokens new tokens per row (EOS suppressed, so every variant does the same work), sampling
at temperature 1. Variants, alternating, each timed --repeats times (median):

  loop            the floor: prefill, then one single-token forward per step with a
                  dynamic cache and multinomial sampling, nothing else
  generate        transformers' `generate`, dynamic cache
  generate+stats  the same with the rollout's statistics processor (the one-pass rollout)
  static          `generate` with a preallocated static cache (+ the statistics)
  static+compile  the same with the decoding step compiled (first call, with the compile,
                  reported apart)
  rows/4          generate+stats over 4 calls of R/4 rows (batch shape)

Prints ms per decoding step and each variant's ratio to the loop.

taskset -c 0 python scripts/bench_generate.py --rows 32 --tokens 64 --repeats 3 [--compile]

With --rollouts K, the rollout engine (`covo.rollout.engine.HFGenerate`) as training calls it
instead: K rollouts in a row, each on other prompts (other prompt lengths, as batches differ),
the same rows and max new tokens. Engines: dynamic; static with a new cache per call sized to
the call (`fresh`: what a cache that is not kept does); static reusing one cache per (rows,
length bucket); with --compile the two static ones compiled. Prints each call's seconds and the
graphs torch compiled during it (a count after the first call is a recompile).

python scripts/bench_generate.py --model tiny --rollouts 4 --rows 16 --tokens 32 --compile
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LogitsProcessorList, StaticCache

from covo.models.loading import QWEN_CODER_05B, SMOLLM2, build_tiny, load_packaged
from covo.rollout.engine import HFGenerate, SamplingStatistics
from covo.rollout.sampling import encode_prompts, format_prompts

PACKAGED = {"smollm2": SMOLLM2, "qwen_coder_05b": QWEN_CODER_05B}


def prompts(n: int, call: int = 0) -> list[str]:
    """`n` arithmetic prompts; each `call` words them at another length."""
    padding = " Show your steps." * (call % 4)
    return [f"What is {10 + 7 * i % 90} + {11 + 13 * i % 89}?{padding}" for i in range(n)]


class FreshStatic(HFGenerate):
    """The static engine with a new cache per call, sized to the call (nothing kept)."""

    def static_cache(self, model, rows: int, longest: int):
        self.static = None
        self.length_bucket = 1
        return super().static_cache(model, rows, longest)


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def rollouts(model, tokenizer, chat_template, args) -> None:
    """`args.rollouts` calls of each engine, as `RolloutSampler` makes them."""
    engines = {
        "dynamic": lambda: HFGenerate(),
        "static fresh": lambda: FreshStatic("static"),
        "static reused": lambda: HFGenerate("static"),
    }
    if args.compile:
        engines["static fresh+compile"] = lambda: FreshStatic("static", compile=True)
        engines["static reused+compile"] = lambda: HFGenerate("static", compile=True)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    print(
        f"{args.model} on {model.device} ({args.dtype}, {args.threads} thread(s)):"
        f" {args.rollouts} rollouts of {args.rows} rows x up to {args.tokens} new tokens"
    )
    calls = " | ".join(f"call {i + 1} s (graphs)" for i in range(args.rollouts))
    print(f"| engine | {calls} |")
    print("|---|" + "---:|" * args.rollouts)
    for name, make in engines.items():
        torch._dynamo.reset()
        engine, cells = make(), []
        for call in range(args.rollouts):
            texts = format_prompts(
                tokenizer, prompts(args.rows // args.samples, call), chat_template
            )
            enc = encode_prompts(tokenizer, texts, model.device)
            graphs = compiled_graphs()
            sync()
            start = time.perf_counter()
            engine(model, tokenizer, enc, args.samples, args.tokens, 1.0, 1.0)
            sync()
            cells.append(f"{time.perf_counter() - start:.2f} ({compiled_graphs() - graphs})")
        fallback = " (fell back)" if engine.fell_back else ""
        print(f"| {name}{fallback} | " + " | ".join(cells) + " |")


@torch.no_grad()
def loop(model, enc, samples: int, tokens: int) -> None:
    ids = enc["input_ids"].repeat_interleave(samples, 0)
    mask = enc["attention_mask"].repeat_interleave(samples, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1
    )
    for _ in range(tokens):
        probs = torch.softmax(out.logits[:, -1].float(), -1)
        token = torch.multinomial(probs, 1)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=token,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            logits_to_keep=1,
        )


@torch.no_grad()
def generate(
    model,
    enc,
    samples: int,
    tokens: int,
    stats: bool,
    cache: str = "dynamic",
    compile_: bool = False,
):
    processors = LogitsProcessorList([SamplingStatistics(1.0)] if stats else [])
    options = {}
    if cache == "static":
        longest = enc["input_ids"].shape[1] + tokens
        options["cache"] = StaticCache(config=model.config, max_cache_len=longest)
        if compile_:
            from transformers import CompileConfig

            options["compile_config"] = CompileConfig(fullgraph=False)
            options["compile_config"]._compile_all_devices = True
        else:
            options["disable_compile"] = True
    model.generate(
        **enc,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        num_return_sequences=samples,
        logits_processor=processors,
        return_dict_in_generate=True,
        **options,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", choices=sorted(PACKAGED) + ["tiny"])
    parser.add_argument("--rollouts", type=int, default=0, help="K rollouts per engine")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also static+compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "tiny":
        loaded = build_tiny()
    else:
        cache_dir = str(Path("~/.cache/covo").expanduser())
        loaded = load_packaged(PACKAGED[args.model], cache_dir=cache_dir)
    model = loaded.model.to(args.device, getattr(torch, args.dtype)).eval()
    if args.rollouts:
        rollouts(model, loaded.tokenizer, loaded.chat_template, args)
        return
    texts = format_prompts(
        loaded.tokenizer, prompts(args.rows // args.samples), loaded.chat_template
    )
    enc = encode_prompts(loaded.tokenizer, texts, model.device)
    quarter = [
        {k: v[i : i + max(1, len(texts) // 4)] for k, v in enc.items()}
        for i in range(0, len(texts), max(1, len(texts) // 4))
    ]
    variants = {
        "loop": lambda: loop(model, enc, args.samples, args.tokens),
        "generate": lambda: generate(model, enc, args.samples, args.tokens, False),
        "generate+stats": lambda: generate(model, enc, args.samples, args.tokens, True),
        "static": lambda: generate(model, enc, args.samples, args.tokens, True, "static"),
        "rows/4": lambda: [
            generate(model, part, args.samples, args.tokens, True) for part in quarter
        ],
    }
    if args.compile:
        variants["static+compile"] = lambda: generate(
            model, enc, args.samples, args.tokens, True, "static", True
        )
    times = {name: [] for name in variants}
    first = {}
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    for repeat in range(args.repeats + 1):  # the first round warms up (and compiles)
        for name, run in variants.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            elapsed = time.perf_counter() - start
            (times[name] if repeat else first.setdefault(name, [])).append(elapsed)
    floor = statistics.median(times["loop"])
    print(
        f"{args.model} on {model.device} ({args.dtype}, {args.threads} thread(s)):"
        f" {args.rows} rows x {args.tokens} tokens, median of {args.repeats}"
    )
    print("| variant | s | ms/step | / loop | first call s |")
    print("|---|---:|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"| {name} | {median:.2f} | {1000 * median / args.tokens:.1f} | {median / floor:.3f}"
            f" | {first[name][0]:.2f} |"
        )


if __name__ == "__main__":
    main()
