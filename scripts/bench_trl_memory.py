"""Peak memory of a TRL GRPO step with a covo reward against TRL with a trivial reward, same
model and settings, side by side in one run.

Variants (each in its own process, so each peak is its own; one after the other, or at once
with --parallel):

  trl           TRL's GRPOTrainer with a trivial reward (the completion's length)
  covo_capture  the same with CovoReward (covo_last_number, guard off): statistics and each
                row's keys and values from TRL's generate (`perf/stats_from_generate` 1)
  covo_fallback the same with the capture removed: the batched statistics forward, one group
                at a time (the path of every vLLM run)

Per variant: peak RSS of the process over model load and the steps (`ru_maxrss`), the RSS
right before `train()`, their difference (the step's own growth), and its ratio to TRL's.

The step: `--prompts` x `--generations` rows generated at once, trained in micro-batches of
`--micro` rows (gradient accumulation), one optimizer step per generation, fp32, no KL.

python scripts/bench_trl_memory.py --model smollm2_135m --prompts 8 --generations 8 --steps 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("trl", "covo_capture", "covo_fallback")


def rss_gb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def trivial(completions, **kwargs) -> list[float]:
    return [float(len(str(c))) for c in completions]


def run_variant(args) -> dict:
    import torch
    from trl import GRPOTrainer
    from trl_example import dataset, grpo_config

    from covo.integrations.trl import CovoReward
    from covo.integrations.trl.capture import CaptureLifetime
    from covo.models import loading

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    cache = os.environ.get("COVO_CACHE_DIR", str(Path("~/.cache/covo").expanduser()))
    load = {"smollm2_135m": loading.load_smollm2, "qwen_coder_05b": loading.load_qwen_coder_05b}
    loaded = load[args.model](cache_dir=cache)
    config = grpo_config(
        prompts=args.prompts,
        generations=args.generations,
        max_new_tokens=args.max_new_tokens,
        steps=args.steps,
        seed=args.seed,
        micro=args.micro,
        prefix="trl-mem-",
    )
    reward = trivial
    if args.variant != "trl":
        reward = CovoReward("covo_last_number", ["callbacks.collapse_guard=null"])
    trainer = GRPOTrainer(
        reward_funcs=[reward],
        model=loaded.model,
        processing_class=loaded.tokenizer,
        args=config,
        train_dataset=dataset(64, args.seed),
    )
    if args.variant != "trl":
        reward.bind(trainer)
    if args.variant == "covo_fallback":
        callbacks = trainer.callback_handler.callbacks
        callbacks[:] = [c for c in callbacks if not isinstance(c, CaptureLifetime)]
        reward.capture.remove()
        reward.capture = None
    before = rss_gb()
    start = time.perf_counter()
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    logs = [e for e in trainer.state.log_history if "loss" in e or "reward" in e]
    return {
        "variant": args.variant,
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "peak_rss_gb": peak,
        "rss_before_train_gb": before,
        "step_growth_gb": peak - before,
        "seconds": time.perf_counter() - start,
        "mean_length": [e.get("completions/mean_length") for e in logs],
        "stats_from_generate": [e.get("perf/stats_from_generate") for e in logs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="smollm2_135m", choices=["smollm2_135m", "qwen_coder_05b"]
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--micro", type=int, default=8, help="rows per micro-batch")
    parser.add_argument("--parallel", action="store_true", help="run the variants at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}

    def finished(variant: str, process: subprocess.Popen, out: str, err: str) -> None:
        if process.returncode:
            sys.exit(f"{variant} failed ({process.returncode}):\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)

    running = []
    for variant in args.variants:
        command = [sys.executable, __file__, "--variant", variant, "--model", args.model]
        command += ["--prompts", str(args.prompts), "--generations", str(args.generations)]
        command += ["--max-new-tokens", str(args.max_new_tokens), "--steps", str(args.steps)]
        command += ["--micro", str(args.micro)]
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        process = subprocess.Popen(command, env=env, **pipes)
        if args.parallel:
            running.append((variant, process))
        else:  # each variant ends, and is printed, before the next starts
            finished(variant, process, *process.communicate())
    for variant, process in running:
        finished(variant, process, *process.communicate())
    base = next((r for r in results if r["variant"] == "trl"), None)
    header = ["variant", "peak RSS GB", "RSS before train GB", "step growth GB"]
    print("| " + " | ".join([*header, "x TRL peak", "x TRL growth", "s"]) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        peak = f"{r['peak_rss_gb'] / base['peak_rss_gb']:.3f}" if base else ""
        growth = f"{r['step_growth_gb'] / base['step_growth_gb']:.3f}" if base else ""
        print(
            f"| {r['variant']} | {r['peak_rss_gb']:.3f} | {r['rss_before_train_gb']:.3f} |"
            f" {r['step_growth_gb']:.3f} | {peak} | {growth} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
