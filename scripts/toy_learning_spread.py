"""Seed spread of the learning tests: held-out accuracy after short RL runs, per seed.

    taskset -c 0 python scripts/toy_learning_spread.py --seeds 0 1 2 3 4 [Hydra overrides]

Runs exactly what tests/test_learning.py runs (its `SHORT_RUN`, through `covo.train.train`)
with `seed=<s>` for reward=ground_truth and reward=negated_ground_truth, and prints the base
and every run's T=1 accuracy over the 64 held-out problems (8 samples each), then the mean,
min and max change per reward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import hydra
import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rewards", nargs="+", default=["ground_truth", "negated_ground_truth"])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    sys.path.insert(0, str(TESTS))  # the tests' own composition, not a copy of it
    from conftest import compose_config
    from test_learning import SHORT_RUN

    from covo.models import toy_reasoner
    from covo.train import train

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="toy-spread-"))
    cfg = compose_config("train", [*SHORT_RUN, *args.overrides], root / "val")
    items = hydra.utils.instantiate(cfg.data).val_items
    base = toy_reasoner.heldout(toy_reasoner.load(), items)["sampled"]
    print(json.dumps({"base": base}), flush=True)
    changes: dict[str, list[float]] = {r: [] for r in args.rewards}
    for seed in args.seeds:
        for reward in args.rewards:
            overrides = [*SHORT_RUN, f"reward={reward}", f"seed={seed}", *args.overrides]
            out = train(compose_config("train", overrides, root / f"{reward}_{seed}"))
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
