"""Step time of the default training config with reward=covo against reward=ground_truth.

Runs alternate (covo, ground_truth, covo, ground_truth, ...) in one process, each a few steps
from the same seed and weights, so both see the same prompts and the same first rollout.
Prints per-phase times and the step-time ratio: over all steps, and for the first step, whose
rollout is identical in both runs (later rollouts differ in length as the policies diverge).

python scripts/bench_reward_overhead.py --steps 3 --rounds 2 [extra Hydra overrides]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning.pytorch as L
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from covo.train import build

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
PHASES = ["time/rollout_s", "time/reward_s", "time/update_s"]


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        row = {"step_s": time.perf_counter() - self.start, **module.timings}
        row["scoring_tokens"] = module.scoring_counts["perf/scoring_tokens"]
        self.steps.append(row)


def run(reward: str, steps: int, overrides: list[str]) -> list[dict[str, float]]:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            [
                f"reward={reward}",
                f"trainer.max_steps={steps}",
                "logger=none",
                "callbacks=none",
                "export_dir=null",
                "+trainer.limit_val_batches=0",
                *overrides,
            ],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/covo-bench-overhead"
    L.seed_everything(cfg.seed, verbose=False)
    module, datamodule, trainer = build(cfg)
    timer = StepTimer()
    trainer.callbacks.append(timer)
    trainer.fit(module, datamodule=datamodule)
    return timer.steps


def summary(rows: list[dict[str, float]]) -> str:
    mean = {k: statistics.mean(r.get(k, 0.0) for r in rows) for k in ["step_s", *PHASES]}
    return "  ".join(f"{k.removeprefix('time/')} {v:7.2f}" for k, v in mean.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="covo/ground_truth run pairs")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs")
    args = parser.parse_args()
    rows: dict[str, list[dict[str, float]]] = {"covo": [], "ground_truth": []}
    for round_ in range(args.rounds):
        for reward in rows:
            steps = run(reward, args.steps, args.overrides)
            rows[reward] += steps
            print(f"round {round_} {reward:>12}: {summary(steps)}", flush=True)
    print("\nmean over all steps (seconds)")
    for reward, steps in rows.items():
        print(f"{reward:>12}: {summary(steps)}")
    first = rows["covo"][0]["step_s"] / rows["ground_truth"][0]["step_s"]
    print(f"first step (same weights, seed and rollout) ratio covo / ground_truth: {first:.3f}")
    covo = statistics.mean(r["step_s"] for r in rows["covo"])
    truth = statistics.mean(r["step_s"] for r in rows["ground_truth"])
    tokens = statistics.mean(r["scoring_tokens"] for r in rows["covo"])
    print(f"covo scoring tokens per step: {tokens:.0f}")
    print(f"step-time ratio covo / ground_truth: {covo / truth:.3f}")


if __name__ == "__main__":
    main()
