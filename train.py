"""Train a policy with a self-reward: `python train.py reward=covo algorithm=grpo`."""

import sys

import hydra
from omegaconf import DictConfig

from covo.infra.errors import exit_on_missing_launcher, exit_on_renamed_key, exit_on_user_error
from covo.launch.train import RENAMED, optimized_value, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    """The run's `optimized_metric` when one is set: what a sweeper (hparams_search) maximises."""
    result = train(cfg)
    if cfg.optimized_metric is not None:
        return optimized_value(result, cfg.optimized_metric)
    return None


if __name__ == "__main__":
    exit_on_missing_launcher(sys.argv[1:])
    exit_on_renamed_key(sys.argv[1:], RENAMED)
    main()
