"""fp32 against bf16 on this machine: one forward of the default model, side by side.

python scripts/bench_precision.py [--batch 4] [--tokens 128] [--threads N] [--repeats 2]
python scripts/bench_precision.py --layer 1536 8960 --batch 64 --repeats 20   # one linear layer
(`--layer IN OUT`: one of Qwen2.5-1.5B's MLP projections at a decode batch of 64 rows, instead
of the default model's forward).
Decides nothing by itself: `precision: auto` reads the CPU flags (covo.infra.hardware); this prints
what those flags mean here.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import nullcontext

import torch

from covo.infra.hardware import cpu_has_native_bf16
from covo.models.loading import load_smollm2


def timed_forward(model, x, autocast: bool) -> float:
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    if x.is_floating_point():  # a layer's input follows its weights
        x = x.to(next(model.parameters()).dtype)
    with torch.no_grad(), context:
        start = time.perf_counter()
        model(x)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache-dir", default="~/.cache/covo")
    parser.add_argument("--layer", type=int, nargs=2, metavar=("IN", "OUT"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.layer:
        model = torch.nn.Linear(*args.layer, bias=False)
        x = torch.randn(args.batch, args.layer[0])
    else:
        model = load_smollm2(args.cache_dir).model.eval()
        x = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens))
    print(f"native bf16 (avx512_bf16/amx): {cpu_has_native_bf16()}, {args.threads} threads")
    times = {"fp32": [], "bf16 autocast": [], "bf16 weights": []}
    for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
        model.float()
        times["fp32"].append(timed_forward(model, x, autocast=False))
        times["bf16 autocast"].append(timed_forward(model, x, autocast=True))
        model.to(torch.bfloat16)
        times["bf16 weights"].append(timed_forward(model, x, autocast=False))
    base = min(times["fp32"])
    for name, values in times.items():
        print(f"{name:>14}: {min(values) * 1e3:9.2f} ms  ({min(values) / base:5.2f} x fp32)")


if __name__ == "__main__":
    main()
