"""The TRL integration's config (`conf/integrations/trl.yaml` with a covo reward) and the
token budget of one statistics forward when `stats_token_budget` is null."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.initialize import get_gh_backup, restore_gh_from_backup
from omegaconf import DictConfig

from covo.infra.checks import apply_rules, at_least, choice, optional
from covo.infra.configs import conf_dir
from covo.infra.errors import SettingError
from covo.integrations.trl.capture import CACHE_MODES
from covo.rewards.covo.scorer import SCORING_DTYPE_RULE
from covo.rollout.groups import TOKEN_BUDGET

CONF_DIR = conf_dir()
BUDGET_RULE = (
    "stats_token_budget",
    optional(at_least(1, integer_only=True)),
    "an integer >= 1, or null (from the device's free memory)",
)
CACHE_RULE = ("capture_cache", *choice(*CACHE_MODES))
BUDGET_SHARE = 0.05  # of the device's free memory, for one statistics forward


@contextlib.contextmanager
def own_hydra(config_dir: Path):
    """Hydra initialised on `config_dir` for the block, whatever Hydra app is running.

    Not `covo.infra.configs.compose_run`: that composes with the Hydra already initialised,
    which inside a user's own Hydra training script is that script's config folder."""
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir.resolve()), version_base="1.3"):
            yield
    finally:
        restore_gh_from_backup(backup)


def integration_config(reward: str, overrides: Sequence[str] = ()) -> DictConfig:
    """conf/integrations/trl.yaml with `reward` a conf/reward name or a reward YAML's path
    (its defaults list resolved in its own folder); `overrides` in Hydra's syntax
    (`label_column=solution`, `reward.threshold=0.6`)."""
    path = Path(reward).expanduser()
    is_path = reward.endswith((".yaml", ".yml"))
    if is_path and not path.is_file():
        raise ValueError(f"reward: no such file {path}")
    if not is_path and not (CONF_DIR / "reward" / f"{reward}.yaml").is_file():
        raise ValueError(f"unknown reward '{reward}': no conf/reward/{reward}.yaml")
    ours = [o for o in overrides if not (is_path and o.startswith("reward."))]
    with own_hydra(CONF_DIR):
        try:
            cfg = compose("integrations/trl", [*([] if is_path else [f"reward={reward}"]), *ours])
        except ConfigCompositionException as err:  # an unknown key: Hydra's first line names it
            raise SettingError(str(err).splitlines()[0]) from None
    if is_path:
        own = [o.removeprefix("reward.") for o in overrides if o.startswith("reward.")]
        with own_hydra(path.parent):
            cfg.reward = compose(path.stem, own)
    apply_rules(cfg, [SCORING_DTYPE_RULE, BUDGET_RULE, CACHE_RULE])
    return cfg


def device_token_budget(model: torch.nn.Module) -> int:
    """`stats_token_budget: null`: the tokens of one statistics forward whose keys and values
    and activations (about 2 x layers x kv_heads x head_dim + 16 x hidden values a token) fill
    `BUDGET_SHARE` of the device's free memory, between 1024 and 65536; `TOKEN_BUDGET` off
    CUDA."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return TOKEN_BUDGET
    free, _ = torch.cuda.mem_get_info(device)
    return token_budget_for(model.config, next(model.parameters()).element_size(), free)


def token_budget_for(config, element_size: int, free_bytes: int) -> int:
    """`device_token_budget` of a model of `config` whose values take `element_size` bytes,
    with `free_bytes` free."""
    config = getattr(config, "text_config", None) or config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    values = 2 * config.num_hidden_layers * kv_heads * head_dim + 16 * config.hidden_size
    return min(65536, max(1024, int(BUDGET_SHARE * free_bytes) // (values * element_size)))
