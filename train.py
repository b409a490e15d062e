"""Train a policy with a self-reward: `python train.py reward=covo algorithm=grpo`."""

import sys

import hydra
from omegaconf import DictConfig

from covo.errors import exit_on_missing_launcher, exit_on_user_error
from covo.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    exit_on_missing_launcher(sys.argv[1:])
    main()
