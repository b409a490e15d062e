"""Held-out headroom of the toy reasoner: greedy accuracy, T=1 accuracy and pass@8.

    taskset -c 0 python scripts/toy_headroom.py [--weights DIR] [--problems 256]

The held-out problems are data=toy_arithmetic's val split (the configured 64 are its first
64), prompts formatted as training formats them; one thread.
"""

from __future__ import annotations

import argparse
import json

import hydra
import torch

from covo.infra.configs import compose_run
from covo.models import toy_reasoner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="a pretrained folder; default: packaged")
    parser.add_argument("--problems", type=int, default=256)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = compose_run(
        "train",
        ["model=toy_reasoner", "data=toy_arithmetic", f"data.val.num_problems={args.problems}"],
    )
    items = hydra.utils.instantiate(cfg.data).val_items
    loaded = toy_reasoner.load(args.weights)
    metrics = toy_reasoner.heldout(
        loaded, items, args.samples, max_new_tokens=cfg.rollout.max_new_tokens, seed=args.seed
    )
    print(json.dumps({"weights": args.weights or "packaged", "problems": len(items), **metrics}))


if __name__ == "__main__":
    main()
