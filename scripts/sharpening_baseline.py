"""What lowering the temperature alone gives: the untrained policy's held-out accuracy at
several temperatures, with the held-out callback's own sampler, problems and grading.

    python scripts/sharpening_baseline.py --out logs/sharpening/calibrated.json -- \\
        model=toy_calibrated data=toy_calibrated experiment=toy_calibrated_learns \\
        callbacks.heldout_eval.batch_size=32 callbacks.heldout_eval.extractor=boxed

The arguments after `--` are `train.py` overrides (`callbacks=heldout_eval` is added): the
callback is built from them as a training run would build it (its split, number of samples,
token limit, extractor, seed), then evaluates the freshly loaded policy once per temperature
(`--temperatures`, default 0.3 0.5 0.7 1.0), each from the same seeded generator state. Writes
`{"<T>": {"sampled_accuracy", "greedy_accuracy", "maj_accuracy", "problems", "num_samples"}}`,
what `python -m covo.analysis.verdict write --sharpening` reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from covo.callbacks.heldout_eval import heldout_metrics

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.3, 0.5, 0.7, 1.0])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if any(t <= 0 for t in args.temperatures):
        parser.error(f"--temperatures must be > 0, got {args.temperatures}")
    torch.set_num_threads(1)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", ["callbacks=heldout_eval", "threads=1", *args.overrides])
    loaded = instantiate(cfg.model)
    loaded.model.eval()
    node = cfg.callbacks.heldout_eval
    results = {}
    for temperature in args.temperatures:
        evaluator = instantiate(node, temperature=temperature, path=str(args.out) + ".unused")
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(evaluator.seed)
            sampled, greedy = evaluator.generate(loaded)
        metrics = heldout_metrics(
            sampled, greedy, evaluator.labels, evaluator.extract, evaluator.equivalence
        )
        results[f"{temperature:g}"] = metrics | {
            "problems": len(evaluator.labels),
            "num_samples": evaluator.sampling.num_samples,
        }
        print(f"T = {temperature:g}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
