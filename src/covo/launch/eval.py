"""`main` is `covo eval` and `python eval.py`: evaluate a policy on benchmarks."""

import hydra
from omegaconf import DictConfig

from covo.eval import evaluate
from covo.infra.configs import conf_dir
from covo.infra.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)
