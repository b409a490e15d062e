"""Experiment loggers beyond Lightning's defaults.

`JsonlLogger` writes every scalar a run logs to one plain file, `metrics.jsonl`, whatever
else logs it: `covo.report`, `covo.analysis.outcomes` and eval read that file, so they work
with any logger. `wandb_logger` and `mlflow_logger` build Lightning's loggers for Weights &
Biases and MLflow (the `wandb` and `mlflow` extras) with local defaults: W&B offline unless
the user is logged in, MLflow into a local file store. `media_board` gives each logger's own
way of showing a sample table, a histogram and an image.
"""

from __future__ import annotations

import importlib.util
import json
import os
from argparse import Namespace
from pathlib import Path

import numpy as np
from lightning.pytorch.loggers import (
    CSVLogger,
    Logger,
    MLFlowLogger,
    TensorBoardLogger,
    WandbLogger,
)
from lightning.pytorch.utilities import rank_zero_only

from covo.infra.errors import DataError, SettingError

METRICS_FILE = "metrics.jsonl"


class JsonlLogger(Logger):
    """One JSON line per logging call, `{"step": s, "<tag>": value, ...}`, appended to
    `save_dir/metrics.jsonl` by rank 0; a resumed run appends, and readers keep the later
    value of a step logged twice."""

    def __init__(self, save_dir: str | Path):
        super().__init__()
        self._save_dir = Path(save_dir)

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self._save_dir)

    @property
    def log_dir(self) -> str:
        return str(self._save_dir)

    @property
    def path(self) -> Path:
        return self._save_dir / METRICS_FILE

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._save_dir.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    @rank_zero_only
    def log_hyperparams(self, params: dict | Namespace, *args, **kwargs) -> None:
        """The resolved config is the run's `config.yaml`; nothing to add here."""


def read_jsonl_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """`metrics.jsonl` -> {tag: [(step, value)] sorted by step}; the later line wins at a step
    logged twice. Lines without a step (none are written by covo) are skipped."""
    by_step: dict[str, dict[int, float]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not a JSON line ({e.msg})") from None
        step = record.pop("step", None)
        if step is None:
            continue
        for tag, value in record.items():
            by_step.setdefault(tag, {})[int(step)] = float(value)
    return {tag: sorted(points.items()) for tag, points in by_step.items()}


def with_jsonl(loggers: list[Logger], save_dir: str | Path) -> list[Logger]:
    """The run's loggers plus the `metrics.jsonl` writer (last, so `trainer.logger` stays the
    user's first choice)."""
    return [*loggers, JsonlLogger(save_dir)]


def logger_outputs(loggers: list[Logger]) -> dict[str, str]:
    """Where each logger wrote: `tensorboard_dir`, `csv_dir`, `wandb_dir`, `mlflow_dir`,
    `metrics_file`."""
    outputs = {}
    for logger in loggers:
        if isinstance(logger, JsonlLogger):
            outputs["metrics_file"] = str(logger.path)
        elif isinstance(logger, TensorBoardLogger):
            outputs["tensorboard_dir"] = logger.log_dir
        elif isinstance(logger, CSVLogger):
            outputs["csv_dir"] = logger.log_dir
        elif isinstance(logger, WandbLogger):
            outputs["wandb_dir"] = str(logger.experiment.dir)
        elif isinstance(logger, MLFlowLogger):
            outputs["mlflow_dir"] = str(logger.save_dir)
    return outputs


def finish_runs(loggers: list[Logger]) -> None:
    """End the W&B run the fit opened (Lightning leaves it open until the process exits): its
    records are written out now, and the next job of a sweep in this process starts its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def require(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SettingError(f"logger: {module} is not installed (pip install 'covo[{extra}]')")


def wandb_logged_in() -> bool:
    """An API key in the environment or a netrc entry for W&B's host: what `wandb login`
    leaves behind."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text()


def wandb_logger(offline: bool | None = None, **kwargs) -> WandbLogger:
    """Lightning's WandbLogger; `offline: null` = offline unless the user is logged in (an
    offline run syncs later with `wandb sync <save_dir>/wandb/offline-run-*`)."""
    require("wandb", "wandb")
    if offline is None:
        offline = not wandb_logged_in()
    return WandbLogger(offline=offline, **kwargs)


def mlflow_logger(**kwargs) -> MLFlowLogger:
    """Lightning's MLFlowLogger (a `file:` tracking URI keeps runs in a local folder:
    `mlflow ui --backend-store-uri <uri>`)."""
    require("mlflow", "mlflow")
    if str(kwargs.get("tracking_uri", "")).startswith("file:"):
        # MLflow 3 keeps its file store for those who ask for it (it prefers a database)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLFlowLogger(**kwargs)


class WandbBoard:
    """Media through W&B's own objects: a table, a histogram, an image."""

    def __init__(self, logger: WandbLogger):
        self.logger = logger

    def add_text(self, tag: str, markdown: str, step: int) -> None:
        header, _, *rows = markdown.splitlines()
        columns = [c.strip() for c in header.strip("|").split("|")]
        data = [[c.strip() for c in row.strip("|").split(" | ")] for row in rows]
        data = [row for row in data if len(row) == len(columns)]
        self.logger.log_text(key=tag, columns=columns, data=data, step=step)

    def add_histogram(self, tag: str, values, step: int) -> None:
        import wandb

        self.logger.log_metrics({tag: wandb.Histogram(np.asarray(values))}, step=step)

    def add_image(self, tag: str, image, step: int, dataformats: str = "HWC") -> None:
        self.logger.log_image(key=tag, images=[np.asarray(image)], step=step)


class MlflowBoard:
    """Media as MLflow artifacts: the sample table as a Markdown file per step, a histogram's
    values as a JSON file per step (MLflow has no histogram view), images with their step."""

    def __init__(self, logger: MLFlowLogger):
        self.client, self.run_id = logger.experiment, logger.run_id

    def add_text(self, tag: str, markdown: str, step: int) -> None:
        self.client.log_text(self.run_id, markdown, f"{tag}/step_{step:06d}.md")

    def add_histogram(self, tag: str, values, step: int) -> None:
        values = [float(v) for v in np.asarray(values).ravel()]
        record = {"step": step, "values": values}
        self.client.log_dict(self.run_id, record, f"{tag}/step_{step:06d}.json")

    def add_image(self, tag: str, image, step: int, dataformats: str = "HWC") -> None:
        self.client.log_image(self.run_id, np.asarray(image), key=tag.replace("/", "."), step=step)


def media_boards(loggers: list[Logger]) -> list:
    """For each logger that can show media, an object with `add_text`, `add_histogram` and
    `add_image` (TensorBoard's SummaryWriter has them itself)."""
    boards = []
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            boards.append(logger.experiment)
        elif isinstance(logger, WandbLogger):
            boards.append(WandbBoard(logger))
        elif isinstance(logger, MLFlowLogger):
            boards.append(MlflowBoard(logger))
    return boards
