"""What scripts/trl_covo.py and scripts/bench_trl_memory.py share: covo's arithmetic problems as
a TRL prompt dataset, and the GRPOConfig of a CPU step (the `trl` extra).

Both scripts run from scripts/, which Python puts first on the path: `from trl_example import ...`.
"""

from __future__ import annotations

import tempfile

from omegaconf import OmegaConf

from covo.data.arithmetic import generate
from covo.infra.configs import conf_dir


def dataset(num_problems: int, seed: int):
    """`num_problems` arithmetic problems, each a one-message chat prompt with its columns."""
    from datasets import Dataset

    template = OmegaConf.load(conf_dir() / "data" / "arithmetic.yaml").prompt_template
    return Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": template.format(problem=p["problem"])}], **p}
            for p in generate(num_problems, seed=seed)
        ]
    )


def grpo_config(
    *,
    prompts: int,
    generations: int,
    max_new_tokens: int,
    steps: int,
    seed: int,
    micro: int | None = None,
    prefix: str = "trl-covo-",
):
    """TRL's GRPOConfig of a CPU step: `prompts` x `generations` rows sampled at once and
    trained in micro-batches of `micro` rows (None: all rows in one), one optimizer step per
    generation, fp32, no KL, sampling at temperature 1, a log every step, no checkpoints; the
    output folder is a fresh temporary one named `prefix`..."""
    from trl import GRPOConfig

    rows = prompts * generations
    micro = rows if micro is None else micro
    if micro < 1 or rows % micro:
        raise SystemExit(f"error: --micro {micro} must divide prompts x generations = {rows}")
    return GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix=prefix),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=rows // micro,
        num_generations=generations,
        max_completion_length=max_new_tokens,
        temperature=1.0,
        beta=0.0,
        learning_rate=1e-6,
        gradient_checkpointing=False,
        max_steps=steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=seed,
    )
