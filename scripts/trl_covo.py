"""CoVo as the reward of TRL's GRPOTrainer: SmolLM2-135M-Instruct on covo's arithmetic problems.

python scripts/trl_covo.py --steps 2 [--reward covo_paper] [--prompts 2 --generations 4]
                            [--stop-on-alarm]

The reward judges as in the default run (`conf/experiment/smollm2_arithmetic.yaml`'s reward
keys: SmolLM2 rarely writes \\boxed{}, so the last number counts as the answer). Each step
samples `--prompts` problems x `--generations` completions (one optimizer step per
generation, no KL, fp32, one torch thread) and prints TRL's reward next to CoVo's components
and diagnostics (reward/..., diag/...), as logged through TRL's `log_metric`, and the collapse
guard's signals (collapse/...): `bind` adds the guard with conf/callbacks/default.yaml's rules.
Needs the `trl` extra (`pip install -e '.[trl]'`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from trl_example import dataset, grpo_config

from covo.integrations.trl import MISSING, CovoReward, grpo_trainer
from covo.models.loading import load_smollm2

SHOWN = ("reward", "reward/", "diag/accuracy", "train/entropy", "collapse/", "time/", "step_time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--reward",
        default="covo_last_number",
        help="conf/reward name or a reward YAML (default: the default run's CoVo)",
    )
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stop-on-alarm", action="store_true", help="the collapse guard stops training"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        import trl  # noqa: F401  (the extra, before anything is loaded)
        from transformers import TrainerCallback
    except ImportError:
        sys.exit(f"error: {MISSING}")
    stop = f"callbacks.collapse_guard.stop_on_alarm={str(args.stop_on_alarm).lower()}"
    reward = CovoReward(args.reward, [stop])
    cache = os.environ.get("COVO_CACHE_DIR", str(Path("~/.cache/covo").expanduser()))
    loaded = load_smollm2(cache_dir=cache)
    config = grpo_config(
        prompts=args.prompts,
        generations=args.generations,
        max_new_tokens=args.max_new_tokens,
        steps=args.steps,
        seed=args.seed,
    )

    class PrintRewards(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                shown = {k: v for k, v in logs.items() if k.startswith(SHOWN)}
                print(
                    f"step {state.global_step}: " + ", ".join(f"{k} {v}" for k, v in shown.items())
                )

    trainer = grpo_trainer(
        reward,
        model=loaded.model,
        processing_class=loaded.tokenizer,
        args=config,
        train_dataset=dataset(64, args.seed),
        callbacks=[PrintRewards()],
    )
    watch = reward.guard.watch
    rules = ", ".join(f"{r.signal} {r.kind} {r.value:g}" for r in watch.detector.rules)
    print(
        f"collapse guard: {rules} (alarm after {watch.detector.window} saturated steps);"
        f" weights kept in {config.output_dir}/pre_collapse"
    )
    trainer.train()


if __name__ == "__main__":
    main()
