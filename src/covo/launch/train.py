"""`train(cfg)`: check and compose the run from the config, and fit it; `main` is `covo train`
and `python train.py`."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
import lightning.pytorch as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import DictConfig, OmegaConf, open_dict

from covo.callbacks.progress import StepProgressBar
from covo.callbacks.step_timer import StepTimer
from covo.infra.configs import conf_dir
from covo.infra.errors import (
    SettingError,
    exit_on_missing_launcher,
    exit_on_renamed_key,
    exit_on_user_error,
)
from covo.infra.hardware import auto_precision
from covo.infra.resume import AtomicCheckpointIO, SeedPerRank, recover_checkpoint
from covo.launch.settings import PRECISION_COMPUTE, check_train
from covo.metrics.loggers import finish_runs, logger_outputs, with_jsonl
from covo.models.export import export_policy

log = logging.getLogger(__name__)

# Lightning's own notices that say nothing about this run: its pytree helper's use of a
# deprecated torch API, and a manual-optimization note whose snippet saves pre-step weights
# (ours checkpoint after the step on purpose: that is what a resume continues from).
QUIET = [
    r".*isinstance\(treespec, LeafSpec\)",
    r"Using ModelCheckpoint with manual optimization",
]
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
# root keys of train.yaml that moved into its `module` node (the LightningModule's call)
RENAMED = {
    key: f"module.{key}"
    for key in (
        "scoring_dtype",
        "reference_dtype",
        "reuse_rollout_cache",
        "max_grad_norm",
        "samples_every_n_steps",
        "plots_every_n_steps",
        "val_extractor",
    )
}
PRECISION_OF_DTYPE = {"float32": "32-true", "bfloat16": "bf16-mixed", "float16": "16-mixed"}


def instantiate_dict(cfg: DictConfig | None) -> list:
    """A config node of named constructor calls (callbacks, loggers) -> list of objects."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(node) for node in cfg.values() if node is not None]


def resolve_auto(cfg: DictConfig) -> None:
    """`trainer.precision: auto` follows `model.dtype` (the compute dtype) when set, else what
    this hardware runs fast; `rollout.dtype: auto` decodes in the resolved compute dtype."""
    compute = cfg.model.dtype
    with open_dict(cfg):
        if cfg.trainer.precision == "auto":
            cfg.trainer.precision = PRECISION_OF_DTYPE.get(compute) or auto_precision(
                cfg.trainer.accelerator
            )
        if cfg.rollout.dtype == "auto":
            dtype = PRECISION_COMPUTE.get(str(cfg.trainer.precision))
            cfg.rollout.dtype = dtype if dtype != "float32" else None


def precision_plugin(trainer: DictConfig) -> MixedPrecision | None:
    """A precision plugin to use instead of `trainer.precision`. On a CPU Lightning runs
    `16-mixed` as bf16-mixed, while the rollout replica follows the configured fp16: the fp16
    autocast and its GradScaler are built here instead (torch runs both on CPUs)."""
    if str(trainer.precision) == "16-mixed" and trainer.accelerator == "cpu":
        return MixedPrecision("16-mixed", "cpu")
    return None


def build(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    # Lightning's INFO notices are about Lightning (no GPU, no TPU, a product tip, settings
    # echoed back); its warnings still show
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # ... except which processes of a distributed run joined (MEMBER: 2/2): the run's own
    logging.getLogger("lightning.fabric.utilities.distributed").setLevel(logging.INFO)
    resolve_auto(cfg)
    log.info("precision: %s (trainer.precision)", cfg.trainer.precision)
    reward = check_train(cfg)  # the reward is built before the model: it needs none
    module = hydra.utils.instantiate(cfg.module, reward=reward)
    datamodule = hydra.utils.instantiate(cfg.data)
    # each rank samples with its own seed from the start of fitting
    callbacks = [SeedPerRank(cfg.seed), *instantiate_dict(cfg.callbacks)]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(StepProgressBar())
    plugins = [AtomicCheckpointIO()]
    precision = precision_plugin(cfg.trainer)
    if precision is not None:
        plugins.append(precision)
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        **({"precision": None} if precision is not None else {}),
        strategy=hydra.utils.instantiate(cfg.strategy),
        logger=with_jsonl(instantiate_dict(cfg.logger), cfg.paths.output_dir),
        callbacks=callbacks,
        enable_checkpointing=bool(cfg.callbacks),
        plugins=plugins,
    )
    return module, datamodule, trainer


def write_config(cfg: DictConfig) -> Path:
    """The resolved config into the run directory; logs the overrides and where it went."""
    path = Path(cfg.paths.output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    overrides = []
    if HydraConfig.initialized():
        overrides = list(HydraConfig.get().overrides.task)
    log.info("overrides: %s", " ".join(overrides) or "(none)")
    log.info("config: %s", path)
    return path


def train(cfg: DictConfig) -> dict:
    """Fit the policy; returns the last logged metrics and where the outputs went."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module, datamodule, trainer = build(cfg)
    if trainer.global_rank == 0:
        write_config(cfg)
    if cfg.ckpt_path and trainer.global_rank == 0:
        recover_checkpoint(Path(cfg.ckpt_path))  # a save killed between its two renames
    trainer.strategy.barrier("checkpoint_recovered")
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    outputs = {"output_dir": str(cfg.paths.output_dir)}
    outputs |= logger_outputs(trainer.loggers)
    finish_runs(trainer.loggers)
    if cfg.export_dir:
        export_policy(module, Path(cfg.export_dir), trainer, cfg.export_adapters)
        outputs["export_dir"] = str(cfg.export_dir)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.global_rank == 0:
        for name, path in outputs.items():
            log.info("%s: %s", name, path)
    return {"metrics": metrics, **outputs}


def optimized_value(result: dict, name: str) -> float:
    """The value of the metric `optimized_metric` names, from what `train` returned."""
    metrics = result["metrics"]
    if name not in metrics:
        raise SettingError(
            f"optimized_metric: {name!r} was not logged by this run"
            f" (logged: {', '.join(sorted(metrics)) or 'nothing'})"
        )
    return metrics[name]


def timed_steps(cfg: DictConfig, output_dir: str) -> list[dict[str, float]]:
    """Train the run `cfg` (its outputs in `output_dir`) and return each step's `StepTimer` row."""
    with open_dict(cfg):
        cfg.paths.output_dir = output_dir
    L.seed_everything(cfg.seed, verbose=False)
    module, datamodule, trainer = build(cfg)
    timer = StepTimer()
    trainer.callbacks.append(timer)
    trainer.fit(module, datamodule=datamodule)
    return timer.steps


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
@exit_on_user_error
def run(cfg: DictConfig) -> float | None:
    """The run's `optimized_metric` when one is set: what a sweeper (hparams_search) maximises."""
    result = train(cfg)
    if cfg.optimized_metric is not None:
        return optimized_value(result, cfg.optimized_metric)
    return None


def main() -> None:
    """Train from the command line's Hydra overrides (`sys.argv[1:]`)."""
    exit_on_missing_launcher(sys.argv[1:])
    exit_on_renamed_key(sys.argv[1:], RENAMED)
    run()
