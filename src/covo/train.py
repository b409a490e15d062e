"""`train(cfg)`: compose the run from the config and fit it."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning.pytorch as L
from omegaconf import DictConfig, OmegaConf, open_dict

from covo.export import export_policy
from covo.hardware import auto_dtype, auto_precision
from covo.module import SelfRewardRL

log = logging.getLogger(__name__)


def instantiate_dict(cfg: DictConfig | None) -> list:
    """A config node of named constructor calls (callbacks, loggers) -> list of objects."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(node) for node in cfg.values() if node is not None]


def resolve_auto(cfg: DictConfig) -> None:
    """`precision: auto` and `rollout.dtype: auto` follow what this hardware runs fast."""
    accelerator = cfg.trainer.accelerator
    with open_dict(cfg):
        if cfg.trainer.precision == "auto":
            cfg.trainer.precision = auto_precision(accelerator)
        if cfg.rollout.dtype == "auto":
            cfg.rollout.dtype = auto_dtype(accelerator)


def build(cfg: DictConfig) -> tuple[SelfRewardRL, L.LightningDataModule, L.Trainer]:
    resolve_auto(cfg)
    loaded = hydra.utils.instantiate(cfg.model)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = SelfRewardRL(
        model=loaded,
        reward=hydra.utils.instantiate(cfg.reward),
        algorithm=hydra.utils.instantiate(cfg.algorithm),
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler),
        rollout=cfg.rollout,
        max_grad_norm=cfg.max_grad_norm,
        scoring_dtype=cfg.scoring_dtype,
        reuse_rollout_cache=cfg.reuse_rollout_cache,
        samples_every=cfg.samples_every,
        plots_every=cfg.plots_every,
        threads=cfg.threads,
    )
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        strategy=hydra.utils.instantiate(cfg.strategy),
        logger=instantiate_dict(cfg.get("logger")) or False,
        callbacks=instantiate_dict(cfg.get("callbacks")),
        enable_checkpointing=bool(cfg.get("callbacks")),
    )
    return module, datamodule, trainer


def train(cfg: DictConfig) -> dict:
    """Fit the policy; returns the last logged metrics and where the outputs went."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module, datamodule, trainer = build(cfg)
    if trainer.global_rank == 0:
        log.info("Config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    outputs = {"output_dir": str(cfg.paths.output_dir)}
    if trainer.logger is not None:
        outputs["tensorboard_dir"] = trainer.logger.log_dir
    if cfg.get("export_dir"):
        export_policy(module, Path(cfg.export_dir), trainer)
        outputs["export_dir"] = str(cfg.export_dir)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.global_rank == 0:
        for name, path in outputs.items():
            log.info("%s: %s", name, path)
    return {"metrics": metrics, **outputs}
