"""Step time of the toy reasoner on one thread: 4 prompts x 8 samples, reward, update.

    taskset -c 0 python scripts/bench_toy_step.py --steps 10 [extra Hydra overrides]

Each reward (ground_truth, covo) runs `--steps` steps from the same seed and weights after a
one-step warm-up run that is not counted (a process's first step pays one-time costs). Prints
each reward's mean per-phase and total step time (wall), and the process's CPU time per step
(`cpu_s`: on a shared machine the wall times include waiting for the core), in seconds.
Validation is off; all-zero groups are kept (`algorithm.filter.drop_all_zero=false`), so
every step makes its update.
"""

from __future__ import annotations

import argparse
import statistics

from covo.infra.configs import compose_run
from covo.launch.train import timed_steps

PHASES = ["time/rollout_s", "time/reward_s", "time/update_s"]
TOY_STEP = [
    "model=toy_reasoner",
    "data=toy_arithmetic",
    "data.batch_size=4",
    "rollout.num_samples=8",
    "threads=1",
    "logger=none",
    "callbacks=none",
    "export_dir=null",
    "+trainer.limit_val_batches=0",
    "algorithm.filter.drop_all_zero=false",
]


def run(reward: str, steps: int, overrides: list[str]) -> list[dict[str, float]]:
    cfg = compose_run(
        "train", [*TOY_STEP, f"reward={reward}", f"trainer.max_steps={steps}", *overrides]
    )
    return timed_steps(cfg, "/tmp/covo-bench-toy-step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()
    run("ground_truth", 1, args.overrides)
    for reward in ("ground_truth", "covo"):
        rows = run(reward, args.steps, args.overrides)
        mean = {
            k: statistics.mean(r.get(k, 0.0) for r in rows) for k in [*PHASES, "step_s", "cpu_s"]
        }
        phases = "  ".join(f"{k.removeprefix('time/')} {v:.3f}" for k, v in mean.items())
        print(f"{reward:>12} ({len(rows)} steps, mean s): {phases}", flush=True)


if __name__ == "__main__":
    main()
