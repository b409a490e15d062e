"""Where covo's configs are: `covo/conf` inside an installed wheel, else the checkout's `conf/`
(an editable install, or `src/` on the path). Every entry point composes from `conf_dir()`;
a command that composes further configs inside its run (a study's rewards, each training run
of `covo outcomes`) composes them with `compose_run`, through the run's `hydra.searchpath`."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from omegaconf import DictConfig

from covo.infra.errors import SettingError


def conf_dir() -> Path:
    package = Path(str(files("covo")))
    packaged = package / "conf"
    return packaged if packaged.is_dir() else package.parents[1] / "conf"


def searchpath_override() -> list[str]:
    """`hydra.searchpath=[...]` of the run in progress, as one override (a training process
    it starts gets it too); none outside a run or when the run adds no folder."""
    if not HydraConfig.initialized() or not HydraConfig.get().searchpath:
        return []
    quoted = ("'" + path.replace("'", "\\'") + "'" for path in HydraConfig.get().searchpath)
    return [f"hydra.searchpath=[{','.join(quoted)}]"]


def compose_run(config_name: str | None, overrides: list[str]) -> DictConfig:
    """covo's `config_name` (None: an empty primary config) with `overrides`, composed as the
    run in progress composes: options from covo's `conf/` and from every folder of the run's
    `hydra.searchpath` (a user's `reward/my_reward.yaml`)."""
    overrides = [*overrides, *searchpath_override()]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name, overrides=overrides)
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose(config_name, overrides=overrides)


def reward_config(name: str) -> DictConfig:
    """`reward/<name>.yaml` as `reward=<name>` composes it (its defaults list resolved), from
    covo's `conf/` or the run's `hydra.searchpath`; an unknown name is the `rewards` setting's
    error."""
    try:
        return compose_run(None, [f"+reward={name}"]).reward
    except MissingConfigException:
        raise SettingError(
            f"rewards: unknown reward '{name}' (no reward/{name}.yaml in covo's conf/ or the "
            "run's hydra.searchpath)"
        ) from None
