"""Seed spread of the learning tests: held-out accuracy after short RL runs, per seed.

    taskset -c 0 python scripts/toy_learning_spread.py --seeds 0 1 2 3 4 [Hydra overrides]
    taskset -c 0 python scripts/toy_learning_spread.py --experiment toy_calibrated_learns \
        --steps 30 --rewards majority

Runs what tests/test_learning.py runs (`covo.launch.train.train` on
`experiment=toy_reasoner_learns`,
40 steps, no validation, logger or checkpoints) with `seed=<s>` for reward=ground_truth and
reward=negated_ground_truth, and prints the base and every run's T=1 accuracy over the
held-out problems (8 samples each), then the mean, min and max change per reward.
`--experiment`, `--steps` and `--rewards` set another lab's test (tests/test_learning.py's
label-free test: the calibrated lab, majority).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import hydra
import torch
from omegaconf import open_dict

from covo.infra.configs import compose_run
from covo.launch.train import train
from covo.models import toy_reasoner

SHORT_RUN = [  # tests/test_learning.py's, after the experiment and its length
    "+trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "callbacks=none",
]


def compose_config(overrides: list[str], output_dir: Path):
    cfg = compose_run("train", overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rewards", nargs="+", default=["ground_truth", "negated_ground_truth"])
    parser.add_argument("--experiment", default="toy_reasoner_learns")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="toy-spread-"))
    run = [f"experiment={args.experiment}", f"trainer.max_steps={args.steps}", *SHORT_RUN]
    cfg = compose_config([*run, *args.overrides], root / "val")
    items = hydra.utils.instantiate(cfg.data).val_items
    base = toy_reasoner.heldout(hydra.utils.instantiate(cfg.model), items)["sampled"]
    print(json.dumps({"base": base}), flush=True)
    changes: dict[str, list[float]] = {r: [] for r in args.rewards}
    for seed in args.seeds:
        for reward in args.rewards:
            overrides = [*run, f"reward={reward}", f"seed={seed}", *args.overrides]
            out = train(compose_config(overrides, root / f"{reward}_{seed}"))
            after = toy_reasoner.heldout(toy_reasoner.load(out["export_dir"]), items)["sampled"]
            changes[reward].append(after - base)
            print(json.dumps({"reward": reward, "seed": seed, "after": after}), flush=True)
    for reward, deltas in changes.items():
        print(
            f"{reward}: change mean {statistics.mean(deltas):+.3f} "
            f"min {min(deltas):+.3f} max {max(deltas):+.3f} over seeds {args.seeds}"
        )


if __name__ == "__main__":
    main()
