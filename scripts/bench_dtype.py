"""fp32 against bf16 for one linear layer on this CPU, side by side in one run: whether a
study or a rollout should load its weights in bf16 (`model.master_dtype=bfloat16`).

    taskset -c 0,1 python scripts/bench_dtype.py --threads 2 --rows 64 --features 1536 8960

The default shape is one MLP projection of Qwen2.5-1.5B at a decode batch of 64 rows; the
variants alternate over `--repeats` rounds and the medians are compared.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def seconds(layer: torch.nn.Linear, x: torch.Tensor, calls: int) -> float:
    with torch.no_grad():
        layer(x)
        start = time.perf_counter()
        for _ in range(calls):
            layer(x)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--features", type=int, nargs=2, default=[1536, 8960])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp32 = torch.nn.Linear(*args.features, bias=False)
    x = torch.randn(args.rows, args.features[0])
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    variants = {"float32": (fp32, x), "bfloat16": (bf16, x.bfloat16())}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (layer, inputs) in variants.items():
            times[name].append(seconds(layer, inputs, args.calls))
    flops = 2 * args.rows * args.features[0] * args.features[1]
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name}: {median * 1e3:.2f} ms per call, {flops / median / 1e9:.1f} GFLOP/s")
    ratio = statistics.median(times["float32"]) / statistics.median(times["bfloat16"])
    print(f"bf16 speed-up: {ratio:.2f}x")


if __name__ == "__main__":
    main()
