"""Evaluate a policy: `python eval.py benchmark=[gsm8k,math500] max_samples=20`."""

import hydra
from omegaconf import DictConfig

from covo.eval import evaluate
from covo.infra.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
