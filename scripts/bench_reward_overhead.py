"""Step time of the default training config with reward=covo against reward=ground_truth.

Runs alternate in one process, each a few steps from the same seed and weights, so all see
the same prompts and the same first rollout; each round rotates the order (the first run of a
round was seen to be the slowest). Every run keeps all-zero groups
(`algorithm.filter.drop_all_zero=false`, overridable): with a small model the verifier rewards
most groups with zeros, and the filter would then skip their update, so the ratio would
measure the filter rather than the reward.
`covo_refeed` is reward=covo with module.reuse_rollout_cache=false: its scorer feeds every
trajectory again instead of reading it from the rollout's keys and values.
A one-step covo warm-up run comes first and is not counted: the first run in a process pays
one-time costs (allocator, thread pools, kernels for new shapes, the answer checker's first
parse): they were seen to add 40% to a first update on CPU, and a GPU run's first CoVo step
once took twice as long as its others.
Prints per-phase times and the step-time ratios: over all steps, and for the first step, whose
rollout is identical in all runs (later rollouts differ in length as the policies diverge).

python scripts/bench_reward_overhead.py --steps 3 --rounds 2 [extra Hydra overrides]
"""

from __future__ import annotations

import argparse
import statistics

from covo.infra.configs import compose_run
from covo.launch.train import timed_steps

PHASES = ["time/rollout_s", "time/reward_s", "time/update_s"]
VARIANTS = {
    "covo": ["reward=covo"],
    "covo_refeed": ["reward=covo", "module.reuse_rollout_cache=false"],
    "ground_truth": ["reward=ground_truth"],
}


def run(variant: list[str], steps: int, overrides: list[str]) -> list[dict[str, float]]:
    cfg = compose_run(
        "train",
        [
            *variant,
            f"trainer.max_steps={steps}",
            "logger=none",
            "callbacks=none",
            "export_dir=null",
            "+trainer.limit_val_batches=0",
            "algorithm.filter.drop_all_zero=false",
            *overrides,
        ],
    )
    return timed_steps(cfg, "/tmp/covo-bench-overhead")


def summary(rows: list[dict[str, float]]) -> str:
    mean = {k: statistics.mean(r.get(k, 0.0) for r in rows) for k in ["step_s", *PHASES]}
    return "  ".join(f"{k.removeprefix('time/')} {v:7.2f}" for k, v in mean.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of one run per variant")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()
    run(VARIANTS["covo"], 1, args.overrides)  # warm-up (every phase of every variant), not counted
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            steps = run(VARIANTS[name], args.steps, args.overrides)
            rows[name] += steps
            print(f"round {round_} {name:>12}: {summary(steps)}", flush=True)
    print("\nfirst step, mean over rounds (seconds)")
    firsts = {name: steps[:: args.steps] for name, steps in rows.items()}
    for name, steps in firsts.items():
        print(f"{name:>12}: {summary(steps)}")
    print("\nmean over all steps (seconds)")
    for name, steps in rows.items():
        print(f"{name:>12}: {summary(steps)}")
    truth = rows["ground_truth"]
    for name in ("covo", "covo_refeed"):
        fed = statistics.mean(r["scoring_tokens"] for r in rows[name])
        reused = statistics.mean(r["reused_tokens"] for r in rows[name])
        print(f"{name} scoring tokens per step: {fed:.0f} fed, {reused:.0f} read from the rollout")
    for name in ("covo", "covo_refeed"):
        first = statistics.mean(r["step_s"] for r in firsts[name]) / statistics.mean(
            r["step_s"] for r in firsts["ground_truth"]
        )
        ratio = statistics.mean(r["step_s"] for r in rows[name]) / statistics.mean(
            r["step_s"] for r in truth
        )
        print(f"step-time ratio {name} / ground_truth: {ratio:.3f} (first step {first:.3f})")


if __name__ == "__main__":
    main()
