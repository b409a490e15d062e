"""What lowering the temperature alone gives: the untrained policy's held-out accuracy at
several temperatures, with the held-out callback's own sampler, problems, seeds and grading.

    python scripts/sharpening_baseline.py --out logs/sharpening/calibrated_test.json -- \\
        model=toy_calibrated data=toy_calibrated experiment=toy_calibrated_learns \\
        callbacks.heldout_eval.batch_size=32 callbacks.heldout_eval.extractor=boxed

The arguments after `--` are `train.py` overrides (`callbacks=heldout_eval` is added): the
callback and the rollout's engine are built from them as a training run builds them, then the
freshly loaded policy is evaluated on one split (`--split`, default `test`) as the callback
evaluates it at step 0, once per temperature (`--temperatures`, default 0.3 0.5 0.7 1.0). At the
callback's own temperature the numbers are those of a training run's step-0 record. Writes
`{"<T>": {"sampled_accuracy", "greedy_accuracy", "maj_accuracy", "pass_accuracy", "problems",
"num_samples", "split"}}`, what `python -m covo.analysis.verdict write --sharpening` reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from covo.callbacks.heldout_eval import METRICS, generators_restored
from covo.infra.configs import conf_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", choices=("validation", "test"), default="test")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.3, 0.5, 0.7, 1.0])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if any(t <= 0 for t in args.temperatures):
        parser.error(f"--temperatures must be > 0, got {args.temperatures}")
    torch.set_num_threads(1)
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", ["callbacks=heldout_eval", "threads=1", *args.overrides])
    loaded = instantiate(cfg.model)
    loaded.model.eval()
    engine = instantiate(cfg.rollout.engine)
    results = {}
    for temperature in args.temperatures:
        evaluator = instantiate(
            cfg.callbacks.heldout_eval, temperature=temperature, path=str(args.out) + ".unused"
        )
        if args.split not in evaluator.prompts:
            parser.error(f"data has no {args.split} split (callbacks.heldout_eval.{args.split})")
        with generators_restored(), torch.no_grad():
            record = evaluator.evaluate_split(loaded, engine, args.split, 0, 0, 1)
        metrics = {key: record[key] for key in METRICS}
        results[f"{temperature:g}"] = metrics | {
            "problems": record["problems"],
            "num_samples": record["num_samples"],
            "split": args.split,
        }
        print(f"T = {temperature:g}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
